"""External oracle: the authors' released Mean Teacher code run on this benchmark's protocol, scored by our evaluation.

Why: on the LA ``cpu`` protocol our Mean Teacher is not separable from ``supervised_vnet`` (issue 31). If the
authors' own code gains nothing on this protocol either, the protocol is why; if it gains, our plug-in is wrong.

What runs: UA-MT's released LA scripts (``github:yulequan/UA-MT``, ``code/``), whose Mean Teacher our
``configs/methods/mean_teacher.json`` follows ("UA-MT's LA recipe without the uncertainty mask"):

* ``mean_teacher``: ``code/train_LA_meanteacher_certainty_unlabel.py`` with the uncertainty mask off (every voxel
  certain), which is plain Mean Teacher: MSE of the softmaxes of the student and the noisy EMA teacher on the
  unlabeled images, averaged over all voxels, weight 0.1 times the sigmoid ramp.
* ``supervised``: ``code/train_LA.py``, the authors' supervised-only V-Net, on the labeled cases.

The repository has no licence, so none of its code is stored here. At run time :func:`oracle` extracts ``code/``
from a local git mirror (``git --git-dir <mirror> show <commit>:<path>``) into a temporary folder, applies
:func:`script_patches` there (exact-text edits, each of which must match, or the run stops naming it), writes our own
stand-ins for the packages their imports need that are not installed (``tensorboardX``, ``torchvision``'s
``Compose``/``make_grid``, ``tqdm``, ``skimage``: logging and images only; a real installed package is used first),
and runs the script through a small launcher that turns ``.cuda()`` into a no-op (CPU). The temporary folder is
deleted afterwards. Get the mirror with the search tool's ``fetch`` (``github:yulequan/UA-MT``), which answers with
its git directory.

What is patched (:func:`script_patches`), only as far as this protocol needs:

* data: the first 60 cases of LA's ``train.list`` written as half-resolution copies (:func:`write_half_resolution`:
  our ``bundle.data.transforms.preprocessing`` with ``resample_factor`` 0.5, i.e. MONAI ``Zoomd`` trilinear for the
  image, nearest for the label, then the z-score) in the layout their ``LAHeart`` reads, the first K labeled;
* patch 112x112x80 -> the protocol's 64x64x32; labeled indices 16 -> K (unlabeled: the other training cases);
* LR schedule: their x0.1 every 2500 iterations -> the protocol's x0.1 at 650 and 900;
* consistency ramp: their ``r(t // 150, 40)`` -> the protocol's ``r(t // 6, 250 / 6)``, i.e. our
  ``stepped_rampup(t, 250, 6)`` exactly;
* uncertainty mask off (``mean_teacher`` only); DataLoader workers 4 -> 0 (as our benchmark);
* ``train_LA.py`` stops after ``max_iterations`` instead of one more.

Batch 2 labeled + 2 unlabeled, ``max_iterations``, seed, base LR 0.01, consistency weight 0.1 and EMA decay 0.99 go
in as their own command-line arguments (their SGD's momentum 0.9 and weight decay 1e-4 are ours already). The
launcher also stamps the wall clock and CPU time after every optimizer step (``steps.json``): on a shared machine
the CPU seconds per iteration plan a run. Training is theirs, in fp32 (the protocol trains ours in bf16 autocast),
with their augmentation (random rot90 + flip, random crop). Scoring is ours: their final weights in their ``VNet``,
put in eval mode, through our evaluation of the ``cpu`` protocol (the same preprocessing of the 20 test cases,
sliding window 64x64x32 at strides 9x9x2, predictions inverted to the original grid, ``bundle.inference.metrics``
against the original labels). The record, ``oracle_la_<protocol>_<method>_k<K>_seed<seed>.json``, has the accuracy
records' per-case shape, its own ``kind`` (``oracle``), the mirror's commit and the patch list.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch
from monai.engines import SupervisedEvaluator

from benchmarking.runs import (
    CONFIG_DIR,
    git_commit,
    hardware,
    method_configs,
    parse_bundle,
    protocol_overrides,
    read_metrics,
    resolved_hyperparameters,
    run_logged,
    write_json,
)
from bundle.config.errors import BundleError
from bundle.data.datalists import LA_FILE_NAME, la_items, read_case_list
from bundle.data.transforms import preprocessing
from bundle.engine.precision import AutocastInference
from bundle.inference.evaluation import MetricsReportHandler
from bundle.networks.subnets import SoftmaxOutput

#: the authors' repository, its scripts per method, and the name of the weights file each writes at the end.
REPOSITORY = "yulequan/UA-MT"
SCRIPTS = {
    "mean_teacher": "code/train_LA_meanteacher_certainty_unlabel.py",
    "supervised": "code/train_LA.py",
}
#: the network their ``test_LA.py`` builds (keyword arguments of their ``networks.vnet.VNet``).
NETWORK_ARGS = {"n_channels": 1, "n_classes": 2, "normalization": "batchnorm", "has_dropout": True}
#: folder (inside the temporary folder) their ``--root_path`` points at; their ``LAHeart`` reads ``../train.list``.
DATA_FOLDER = os.path.join("data", "LA")
EXPERIMENT = "oracle"

#: our stand-ins for packages that their imports need and that are not installed; they play no part in training
#: (logging, images for TensorBoard, a progress bar) except ``Compose``, which chains the transforms as
#: ``torchvision.transforms.Compose`` does. They sit last on ``sys.path``: an installed package wins.
FALLBACK_STUBS = {
    "tensorboardX/__init__.py": (
        "class SummaryWriter:\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        pass\n\n"
        "    def __getattr__(self, name):\n"
        "        return lambda *args, **kwargs: None\n"
    ),
    "torchvision/__init__.py": "from . import transforms, utils\n",
    "torchvision/transforms.py": (
        "class Compose:\n"
        "    def __init__(self, transforms):\n"
        "        self.transforms = transforms\n\n"
        "    def __call__(self, sample):\n"
        "        for transform in self.transforms:\n"
        "            sample = transform(sample)\n"
        "        return sample\n"
    ),
    "torchvision/utils.py": "def make_grid(*args, **kwargs):\n    return None\n",
    "tqdm/__init__.py": "def tqdm(iterable=None, *args, **kwargs):\n    return iterable\n",
    "skimage/__init__.py": "from . import measure\n",
    "skimage/measure.py": "",
}

#: runs one of their scripts on the CPU: ``python launcher.py <script> <args...>`` from the script's folder.
#: It also stamps the wall clock and the process's CPU time after every optimizer step (a global step hook, nothing
#: in their code) into ``steps.json`` beside it: on a shared machine the CPU time per iteration is the figure that
#: plans a run.
LAUNCHER = """\"\"\"Written by benchmarking/oracle.py: run a script of the authors' code on the CPU.\"\"\"
import json
import os
import runpy
import sys
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.getcwd())
sys.path.append(os.path.join(here, "_fallback_stubs"))
torch.nn.Module.cuda = lambda self, device=None: self
torch.Tensor.cuda = lambda self, *args, **kwargs: self
stamps = [[time.perf_counter(), time.process_time()]]
register_optimizer_step_post_hook(
    lambda optimizer, args, kwargs: stamps.append([time.perf_counter(), time.process_time()])
)
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
with open(os.path.join(here, "steps.json"), "w") as handle:
    json.dump({"stamps": stamps, "threads": torch.get_num_threads()}, handle)
"""


class OracleError(BundleError):
    """The oracle cannot run: a missing mirror or dataset, a bad argument, a patch that no longer matches."""

    def __init__(self, problem: str) -> None:
        super().__init__("Cannot run the oracle:", [problem])


@dataclass(frozen=True)
class Patch:
    """One edit of a script: ``old`` (exact text, found ``count`` times) becomes ``new``; with ``end``, the whole
    lines from the one holding ``old`` to the next one holding ``end`` become ``new`` (its lines indented as the
    first replaced line). ``what`` says the change in words, for the record."""

    what: str
    old: str
    new: str
    end: Optional[str] = None
    count: int = 1


def apply_patch(text: str, patch: Patch, name: str) -> str:
    """``text`` with ``patch`` applied; :class:`OracleError` naming ``name`` and the anchor when it does not match
    exactly (their file changed: the patch must be looked at again, never applied loosely)."""
    found = text.count(patch.old)
    if found != patch.count:
        raise OracleError(
            f"{name}: expected {patch.count} occurrence(s) of {patch.old!r}, found {found} ({patch.what})"
        )
    if patch.end is None:
        return text.replace(patch.old, patch.new)
    start = text.rfind("\n", 0, text.index(patch.old)) + 1
    end_at = text.find(patch.end, start + len(patch.old))
    if end_at < 0:
        raise OracleError(f"{name}: no {patch.end!r} after {patch.old!r} ({patch.what})")
    stop = text.find("\n", end_at)
    stop = len(text) if stop < 0 else stop
    indent = re.match(r"[ \t]*", text[start:]).group(0)
    block = "\n".join(indent + line if line else line for line in patch.new.split("\n"))
    return text[:start] + block + text[stop:]


def apply_patches(text: str, patches: Sequence[Patch], name: str) -> str:
    """``text`` with every patch applied in order (:func:`apply_patch`)."""
    for patch in patches:
        text = apply_patch(text, patch, name)
    return text


@dataclass(frozen=True)
class Protocol:
    """The settings of a benchmark protocol the oracle imposes on their script (:func:`protocol_settings`)."""

    patch_size: Tuple[int, int, int]
    labeled_batch: int
    unlabeled_batch: int
    max_iterations: int
    lr: float
    milestones: Tuple[int, ...]
    gamma: float
    rampup_iters: int
    rampup_step: int
    consistency: float
    ema_decay: float
    resample_factor: float
    sw_strides: Tuple[int, int, int]


def protocol_settings(protocol: str = "cpu", max_iterations: Optional[int] = None) -> Protocol:
    """The settings of ``configs/benchmark/la_<protocol>.json`` for our Mean Teacher, resolved as an accuracy run
    resolves them (its ``method_args`` included); ``max_iterations`` replaces the protocol's (a probe), the LR
    milestones and the ramp stay the protocol's."""
    configs = method_configs("mean_teacher", protocol)
    parser = parse_bundle(configs, protocol_overrides(configs))
    iterations = int(parser["max_iterations"] if max_iterations is None else max_iterations)
    if iterations < 1:
        raise OracleError(f"max_iterations must be >= 1, got {iterations}")
    method = resolved_hyperparameters(parser)["method"]  # the built method's arguments (defaults resolved)
    return Protocol(
        patch_size=tuple(int(v) for v in parser["patch_size"]),
        labeled_batch=int(parser.get_parsed_content("train#dataloader#batch_size")),
        unlabeled_batch=int(parser.get_parsed_content("train#unlabeled_dataloader#batch_size")),
        max_iterations=iterations,
        lr=float(parser.get_parsed_content("optimizer#lr")),
        milestones=tuple(int(v) for v in parser.get_parsed_content("lr_scheduler#milestones")),
        gamma=float(parser.get_parsed_content("lr_scheduler#gamma")),
        rampup_iters=int(method["rampup_iters"]),
        rampup_step=int(method["rampup_step"]),
        consistency=float(method["loss_weights"]["cons"]),
        ema_decay=float(method["ema_decay"]),
        resample_factor=float(parser["resample_factor"]),
        sw_strides=tuple(int(v) for v in parser["sw_strides"]),
    )


def script_patches(method: str, num_labeled: int, train_cases: int, protocol: Protocol) -> List[Patch]:
    """The edits of their ``method`` script for ``protocol`` with the first ``num_labeled`` of ``train_cases``
    labeled (see the module docstring); everything else goes in as their own command-line arguments
    (:func:`script_arguments`)."""
    milestones = ", ".join(str(m) for m in protocol.milestones)
    patches = [
        Patch(
            f"patch size 112x112x80 -> {'x'.join(map(str, protocol.patch_size))} (the protocol's)",
            "patch_size = (112, 112, 80)",
            f"patch_size = {tuple(protocol.patch_size)}",
        ),
        Patch(
            f"LR schedule x0.1 every 2500 iterations -> x{protocol.gamma:g} at {milestones} (the protocol's "
            "MultiStepLR, set after every iteration)",
            "if iter_num % 2500 == 0:",
            f"lr_ = base_lr * {protocol.gamma!r} ** sum(iter_num >= m for m in ({milestones},))\n"
            "for param_group in optimizer.param_groups:\n"
            "    param_group['lr'] = lr_",
            end="param_group['lr'] = lr_",
        ),
        Patch("DataLoader workers 4 -> 0 (as our benchmark)", "num_workers=4", "num_workers=0"),
    ]
    if method == "mean_teacher":
        patches += [
            Patch(
                f"labeled cases: the first 16 -> the first {num_labeled}",
                "labeled_idxs = list(range(16))",
                f"labeled_idxs = list(range({num_labeled}))",
            ),
            Patch(
                f"unlabeled cases: 16..79 -> the other training cases {num_labeled}..{train_cases - 1}",
                "unlabeled_idxs = list(range(16, 80))",
                f"unlabeled_idxs = list(range({num_labeled}, {train_cases}))",
            ),
            Patch(
                "uncertainty mask off (plain Mean Teacher): the T = 8 Monte-Carlo teacher passes and their entropy "
                "are replaced by zero uncertainty, so every voxel is below the threshold and the consistency is the "
                "mean over all voxels",
                "T = 8",
                "uncertainty = torch.zeros_like(unlabeled_volume_batch)  # oracle: every voxel certain",
                end="uncertainty = -1.0*",
            ),
            Patch(
                f"consistency ramp quantisation t // 150 -> t // {protocol.rampup_step} (with --consistency_rampup "
                f"{protocol.rampup_iters}/{protocol.rampup_step}: our stepped_rampup(t, {protocol.rampup_iters}, "
                f"{protocol.rampup_step}))",
                "get_current_consistency_weight(iter_num//150)",
                f"get_current_consistency_weight(iter_num//{protocol.rampup_step})",
            ),
        ]
    elif method == "supervised":
        patches += [
            Patch(f"labeled cases: the first 16 -> the first {num_labeled}", "num=16,", f"num={num_labeled},"),
            Patch(
                "stop after max_iterations iterations instead of max_iterations + 1",
                "if iter_num > max_iterations:",
                "if iter_num >= max_iterations:",
                count=2,
            ),
        ]
    else:
        raise OracleError(f"method {method!r}: expected one of {sorted(SCRIPTS)}")
    return patches


def script_arguments(method: str, root_path: str, seed: int, protocol: Protocol) -> List[str]:
    """Their command-line arguments for ``protocol``: data folder, iterations, batch, LR, seed (and for
    ``mean_teacher`` the consistency weight, ramp length in ramp steps and EMA decay)."""
    labeled = protocol.labeled_batch
    batch = labeled + protocol.unlabeled_batch if method == "mean_teacher" else labeled
    arguments = [
        f"--root_path={root_path}",
        f"--exp={EXPERIMENT}",
        f"--max_iterations={protocol.max_iterations}",
        f"--batch_size={batch}",
        f"--base_lr={protocol.lr!r}",
        f"--seed={seed}",
    ]
    if method == "mean_teacher":
        arguments += [
            f"--labeled_bs={labeled}",
            f"--consistency={protocol.consistency!r}",
            f"--consistency_rampup={protocol.rampup_iters / protocol.rampup_step!r}",
            f"--ema_decay={protocol.ema_decay!r}",
        ]
    return arguments


def weights_name(method: str, max_iterations: int) -> str:
    """The file their script writes its final weights to (``train_LA.py`` names it one iteration later)."""
    return f"iter_{max_iterations + (1 if method == 'supervised' else 0)}.pth"


def oracle_split(cases: Sequence[str], train_cases: int, num_labeled: int) -> Dict[str, List[str]]:
    """The benchmark's split of a case list: ``train`` the first ``train_cases`` (their order kept: the first
    ``num_labeled`` are the labeled ones), ``labeled`` those, ``test`` the rest."""
    if len(cases) <= train_cases:
        raise OracleError(f"the case list has {len(cases)} cases, need more than train_cases={train_cases}")
    if not 2 <= num_labeled < train_cases:
        raise OracleError(f"num_labeled must be in [2, {train_cases}) (batches of 2 labeled), got {num_labeled}")
    train = list(cases[:train_cases])
    return {"train": train, "labeled": train[:num_labeled], "test": list(cases[train_cases:])}


def write_half_resolution(dataset_dir: str, cases: Sequence[str], output_dir: str, resample_factor: float) -> None:
    """Write ``output_dir/<case>/mri_norm2.h5`` (datasets ``image`` float32, ``label`` uint8) for each LA case as
    our bundle's preprocessing sees it (:func:`bundle.data.transforms.preprocessing`: MONAI ``Zoomd`` by
    ``resample_factor``, trilinear for the image and nearest for the label, then the z-score), each to a temporary
    name, then renamed."""
    transform = preprocessing(keys=("image", "label"), resample_factor=resample_factor, num_classes=2)
    for item in la_items(dataset_dir, cases):
        data = transform(item)
        folder = os.path.join(output_dir, os.path.basename(os.path.dirname(item["image"])))
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, LA_FILE_NAME)
        with h5py.File(path + ".partial", "w") as handle:
            handle.create_dataset("image", data=np.asarray(data["image"][0], dtype=np.float32))
            handle.create_dataset("label", data=np.asarray(data["label"][0]).round().astype(np.uint8))
        os.replace(path + ".partial", path)


def git_dir(mirror: str) -> str:
    """The git directory of ``mirror`` (a bare mirror, or a work tree holding ``.git``); :class:`OracleError` when
    there is none."""
    path = os.path.join(mirror, ".git") if os.path.isdir(os.path.join(mirror, ".git")) else mirror
    if not os.path.isfile(os.path.join(path, "HEAD")):
        raise OracleError(f"{mirror}: no git directory; fetch github:{REPOSITORY} and pass its git directory")
    return path


def git(git_directory: str, *args: str) -> bytes:
    """Output of ``git --git-dir <git_directory> <args>``; :class:`OracleError` on failure."""
    result = subprocess.run(["git", f"--git-dir={git_directory}", *args], capture_output=True)
    if result.returncode:
        raise OracleError(f"{git_directory}: git {' '.join(args)}: {result.stderr.decode().strip()}")
    return result.stdout


def extract_code(git_directory: str, commit: str, folder: str) -> List[str]:
    """Write every file under ``code/`` of ``commit`` into ``folder`` (paths below ``code/``); return them."""
    paths = git(git_directory, "ls-tree", "-r", "--name-only", commit, "code/").decode().split("\n")
    paths = [p for p in paths if p]
    if not paths:
        raise OracleError(f"{git_directory}: commit {commit} has no code/ folder")
    for path in paths:
        target = os.path.join(folder, os.path.relpath(path, "code"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as handle:
            handle.write(git(git_directory, "show", f"{commit}:{path}"))
    return paths


def missing_packages() -> List[str]:
    """The packages of :data:`FALLBACK_STUBS` that are not installed (their stand-ins are used)."""
    return sorted(
        {name.split("/")[0] for name in FALLBACK_STUBS if importlib.util.find_spec(name.split("/")[0]) is None}
    )


def write_stubs(folder: str) -> None:
    """The launcher and :data:`FALLBACK_STUBS` (under ``_fallback_stubs``) in ``folder``."""
    for name, text in {
        "launcher.py": LAUNCHER,
        **{f"_fallback_stubs/{k}": v for k, v in FALLBACK_STUBS.items()},
    }.items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(text)


ITERATION_LINE = re.compile(r"^\[[0-9:.]+\] iteration (\d+) : loss : (\S+)")


def training_log(path: str) -> Dict[str, Any]:
    """From their ``log.txt``: the last iteration logged and its loss."""
    last, last_loss = None, None
    with open(path) as handle:
        for line in handle:
            match = ITERATION_LINE.match(line)
            if match:
                last, last_loss = int(match.group(1)), float(match.group(2))
    if last is None:
        raise OracleError(f"{path}: no 'iteration N : loss' line; their script did not train")
    return {"last_iteration": last, "last_loss": last_loss}


def step_times(path: str) -> Dict[str, Any]:
    """From the launcher's ``steps.json`` (wall clock and process CPU time at the start and after every optimizer
    step): the number of steps and the median wall and CPU seconds per iteration, the first step (set-up included)
    left out (``None`` with fewer than 2 steps)."""
    with open(path) as handle:
        steps = json.load(handle)
    stamps = steps["stamps"][1:]
    pairs = list(zip(stamps, stamps[1:]))
    wall = statistics.median(b[0] - a[0] for a, b in pairs) if pairs else None
    cpu = statistics.median(b[1] - a[1] for a, b in pairs) if pairs else None
    return {"steps": len(stamps), "wall_seconds_per_iteration": wall, "cpu_seconds_per_iteration": cpu,
            "threads": steps["threads"]}  # fmt: skip


def load_network(code_folder: str, weights: str):
    """Their ``VNet`` (:data:`NETWORK_ARGS`, as their ``test_LA.py``) with the weights of ``weights``, in eval mode."""
    spec = importlib.util.spec_from_file_location("oracle_vnet", os.path.join(code_folder, "networks", "vnet.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.VNet(**NETWORK_ARGS)
    net.load_state_dict(torch.load(weights, map_location="cpu"))
    return net.eval()


def score(net, dataset_dir: str, lists: Dict[str, str], num_labeled: int, protocol: str, output_dir: str):
    """Our evaluation of ``net`` (logits) on the cases of ``lists['test']``: the bundle's ``validate`` pipeline of
    the protocol and ``configs/evaluate.json`` (preprocessing, sliding window at the protocol's strides, inversion
    to the original grid, argmax) with :class:`~bundle.inference.evaluation.MetricsReportHandler` scoring against the
    original labels; returns :func:`benchmarking.runs.read_metrics` of ``output_dir``."""
    configs = method_configs("supervised_vnet", protocol) + [f"{CONFIG_DIR}/evaluate.json"]
    overrides = {"dataset_dir": dataset_dir, "datalists#train_list": lists["train"], "num_labeled": num_labeled,
                 "datalists#val_list": lists["test"], "output_dir": output_dir}  # fmt: skip
    parser = parse_bundle(configs, overrides)
    device = parser.get_parsed_content("device")
    network = AutocastInference(SoftmaxOutput(net.to(device)), parser.get_parsed_content("validate#precision"), device)
    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=parser.get_parsed_content("validate#dataloader"),
        network=network,
        inferer=parser.get_parsed_content("validate#inferer"),
        postprocessing=parser.get_parsed_content("validate#postprocessing"),
        val_handlers=[MetricsReportHandler(output_dir, num_slices=int(parser["figure_slices"]))],
    )
    evaluator.run()
    return read_metrics(output_dir)


def oracle(
    dataset_dir: str,
    mirror: str,
    method: str = "mean_teacher",
    num_labeled: int = 8,
    seed: int = 1337,
    max_iterations: Optional[int] = None,
    protocol: str = "cpu",
    commit: str = "HEAD",
    list_file: str = "train.list",
    train_cases: int = 60,
    results_dir: str = "docs/results",
    runs_dir: str = "runs/benchmark",
    notes: str = "",
) -> str:
    """Train with the authors' ``method`` script (patched for ``protocol``) from the git mirror ``mirror`` and score
    its final weights with our evaluation on the protocol's test cases; see the module docstring.

    ``max_iterations`` (default: the protocol's 1000) shortens a probe; a record of a run shorter than the
    protocol's says so in its name (``_it<N>``). Writes ``<results_dir>/oracle_la_<protocol>_<method>[_it<N>]_k<K>
    _seed<seed>.json``, keeps their log, the step stamps and the final weights in ``<runs_dir>/<name>/``; returns
    the record's path."""
    if method not in SCRIPTS:
        raise OracleError(f"method {method!r}: expected one of {sorted(SCRIPTS)}")
    if not os.path.isdir(dataset_dir):
        raise OracleError(f"{dataset_dir}: LA dataset folder not found")
    git_directory = git_dir(mirror)
    source_commit = git(git_directory, "rev-parse", f"{commit}^{{commit}}").decode().strip()
    settings = protocol_settings(protocol, max_iterations)
    split = oracle_split(read_case_list(os.path.join(dataset_dir, list_file)), train_cases, num_labeled)
    full = max_iterations is None or settings.max_iterations == protocol_settings(protocol).max_iterations
    length = "" if full else f"_it{settings.max_iterations}"
    name = f"oracle_la_{protocol}_{method}{length}_k{num_labeled}_seed{seed}"
    run_dir = os.path.relpath(os.path.join(runs_dir, name))
    os.makedirs(run_dir, exist_ok=True)
    lists = {}
    for key in ("train", "test"):
        lists[key] = os.path.join(run_dir, f"{key}.list")
        with open(lists[key], "w") as handle:
            handle.write("\n".join(split[key]) + "\n")
    our_commit = git_commit()
    tmp = tempfile.mkdtemp(prefix="oracle_")
    try:
        code = os.path.join(tmp, "code")
        extracted = extract_code(git_directory, source_commit, code)
        write_stubs(tmp)
        script = os.path.relpath(SCRIPTS[method], "code")
        patches = script_patches(method, num_labeled, train_cases, settings)
        with open(os.path.join(code, script)) as handle:
            text = apply_patches(handle.read(), patches, f"{REPOSITORY}:{SCRIPTS[method]}")
        with open(os.path.join(code, script), "w") as handle:
            handle.write(text)
        data = os.path.join(tmp, DATA_FOLDER)
        write_half_resolution(dataset_dir, split["train"], data, settings.resample_factor)
        for key in ("train", "test"):  # their LAHeart reads both lists (the test one is built, never used)
            with open(os.path.join(os.path.dirname(data), f"{key}.list"), "w") as handle:
                handle.write("\n".join(split[key]) + "\n")
        arguments = script_arguments(method, data, seed, settings)
        log_path = os.path.join(run_dir, "oracle.log")
        command = [sys.executable, os.path.join(tmp, "launcher.py"), script, *arguments]
        train_seconds = run_logged(command, os.path.abspath(log_path), cwd=code)
        snapshot = os.path.join(tmp, "model", EXPERIMENT)
        log = training_log(os.path.join(snapshot, "log.txt"))
        timing = step_times(os.path.join(tmp, "steps.json"))
        if log["last_iteration"] != settings.max_iterations:
            raise OracleError(f"their log ends at iteration {log['last_iteration']}, not {settings.max_iterations}")
        weights = os.path.join(run_dir, "model.pth")
        shutil.copyfile(os.path.join(snapshot, weights_name(method, settings.max_iterations)), weights)
        shutil.copyfile(os.path.join(snapshot, "log.txt"), os.path.join(run_dir, "their_log.txt"))
        shutil.copyfile(os.path.join(tmp, "steps.json"), os.path.join(run_dir, "steps.json"))
        net = load_network(code, weights)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with torch.no_grad():
        metrics = score(net, dataset_dir, lists, num_labeled, protocol, os.path.join(run_dir, "eval"))
    length_arg = "" if full else f" --max_iterations {settings.max_iterations}"
    record = {
        "kind": "oracle",
        "method": method,
        "protocol": protocol,
        "num_labeled": num_labeled,
        "seed": seed,
        "split": f"train: first {train_cases} of {list_file} ({num_labeled} labeled); test: the remaining cases",
        "evaluation": "test",
        "test_cases": split["test"],
        "command": f"python scripts/benchmark.py oracle --dataset_dir {os.path.relpath(dataset_dir)} --mirror "
        f"<git directory of {REPOSITORY}> --method {method} --num_labeled {num_labeled} --seed {seed}{length_arg}",
        "commit": our_commit,
        "hardware": hardware(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "reference": {
            "repository": REPOSITORY,
            "commit": source_commit,
            "script": SCRIPTS[method],
            "files": extracted,
            "arguments": [a.replace(data, f"<tmp>/{DATA_FOLDER}") for a in arguments],
            "patches": [p.what for p in patches],
            "data": f"the first {train_cases} cases of {list_file} written by bundle.data.transforms.preprocessing "
            f"with resample_factor {settings.resample_factor} (Zoomd trilinear image, nearest label; z-score) as their "
            "LAHeart layout; the test cases scored from the original files by our evaluation",
            "stubs": missing_packages(),
            "network": f"networks.vnet.VNet({', '.join(f'{k}={v!r}' for k, v in NETWORK_ARGS.items())}), eval mode",
            "weights": weights_name(method, settings.max_iterations),
            "training_precision": "fp32",
        },
        "config": {key: list(v) if isinstance(v, tuple) else v for key, v in vars(settings).items()},
        "train_seconds": train_seconds,
        "seconds_per_iteration": timing["wall_seconds_per_iteration"],
        "cpu_seconds_per_iteration": timing["cpu_seconds_per_iteration"],
        "torch_threads": timing["threads"],
        "last_loss": log["last_loss"],
        "notes": notes,
        **metrics,
    }
    return write_json(record, results_dir, name)
