"""Benchmark logic behind ``scripts/benchmark.py``: speed probes, accuracy runs through ``monai.bundle``, results
JSON and the generated ``docs/RESULTS.md``.

Every accuracy run drives the bundle's own configs (``python -m monai.bundle run training`` then the evaluation
overlay) in a subprocess, so the benchmark has no training loop of its own.
"""

from __future__ import annotations

import inspect
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer

from benchmarking.resume import finish_part, read_parts, resumed_note, start_part
from bundle.config.errors import BundleError
from bundle.config.unread_keys import method_parameters
from bundle.engine.precision import (
    AutocastInference,
    cpu_flags,
    cpu_has_native_bf16,
    emulated_bf16,
    resolve_precision,
)
from bundle.engine.trainer import SSLTrainer
from bundle.inference.folder import strides_to_overlap
from bundle.inference.optimization import optimize_for_inference

CONFIG_DIR = "configs"


def cpuinfo_value(key: str, cpuinfo_path: str = "/proc/cpuinfo") -> Optional[str]:
    """The value of ``key`` (e.g. ``model name``, ``vendor_id``) for the first processor in ``cpuinfo_path``; None
    where it is absent or the file cannot be read (e.g. not Linux)."""
    try:
        with open(cpuinfo_path) as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The ``model name`` of the first processor in ``cpuinfo_path`` (``platform.processor()`` elsewhere)."""
    return cpuinfo_value("model name", cpuinfo_path) or platform.processor() or platform.machine()


def cpu_vendor(text: str) -> str:
    """``AMD`` or ``Intel`` from a ``vendor_id`` (``AuthenticAMD``, ``GenuineIntel``) or a model name (``AMD EPYC``,
    ``Intel(R) Xeon(R)``, ``Xeon``); other text is returned as it is."""
    if "AMD" in text:
        return "AMD"
    if "Intel" in text or "Xeon" in text:
        return "Intel"
    return text


#: CPU flags that decide the speed of bf16 and fp32 convolutions, recorded with every speed probe.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "bf16")


def cpu_kind(vendor: str, flags: Sequence[str]) -> str:
    """What a CPU offers for convolutions, the key of :data:`AUTHORS_REFERENCE`: its vendor (:func:`cpu_vendor` of a
    ``vendor_id`` or model name) and the widest of AVX-512 BF16 with AMX, AVX-512 BF16, AVX-512 without BF16, AVX2
    found in its ``/proc/cpuinfo`` ``flags``. The model name is not enough: AMD EPYC machines come with and without
    AVX-512, and the authors' code runs about 3x slower on those without."""
    offered = set(flags)
    if {"avx512_bf16", "amx_bf16"} <= offered:
        level = "AVX-512 BF16 + AMX"
    elif "avx512_bf16" in offered:
        level = "AVX-512 BF16"
    elif "avx512f" in offered:
        level = "AVX-512, no BF16"
    elif "avx2" in offered:
        level = "AVX2, no AVX-512"
    else:
        level = "no AVX2"
    return f"{cpu_vendor(vendor) or 'unknown vendor'}, {level}"


def cpu_description(cpuinfo_path: str = "/proc/cpuinfo") -> Dict[str, Any]:
    """The CPU model, vendor, its :data:`SPEED_FLAGS`, whether it computes in bf16 natively and its
    :func:`cpu_kind`."""
    flags = cpu_flags(cpuinfo_path)
    model = cpu_model(cpuinfo_path)
    vendor = cpu_vendor(cpuinfo_value("vendor_id", cpuinfo_path) or model)
    return {"model": model, "vendor": vendor, "flags": [f for f in SPEED_FLAGS if f in flags],
            "native_bf16": cpu_has_native_bf16(cpuinfo_path), "kind": cpu_kind(vendor, flags)}  # fmt: skip


def hardware() -> str:
    """A one-line description of the machine the numbers come from."""
    cpu = cpu_description()
    bf16 = "native bf16" if cpu["native_bf16"] else "no native bf16"
    text = (
        f"{cpu['model']} ({bf16}; {' '.join(cpu['flags']) or 'no AVX2'}), {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} cores, torch {torch.__version__}"
    )
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def git_commit() -> str:
    """The current commit, with ``+dirty`` when the working tree has uncommitted changes."""
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
        # benchmark outputs (docs/results, RESULTS.md) written by an earlier probe of the same run are not code
        excluded = [":(exclude)docs/results", ":(exclude)docs/RESULTS.md"]
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", *excluded]).returncode != 0
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def parse_bundle(config_files: Sequence[str], overrides: Dict[str, Any]) -> ConfigParser:
    """The bundle's configs merged in order, with ``overrides`` applied, as MONAI's ``run`` would see them."""
    parser = ConfigParser()
    parser.read_config(list(config_files))
    parser.update(overrides)
    return parser


def time_training(
    config_files: Sequence[str],
    overrides: Dict[str, Any],
    iterations: int = 3,
    warmup: int = 1,
) -> Dict[str, float]:
    """Seconds per training iteration of the bundle's method, optimizer and :class:`SSLTrainer` on random
    in-memory batches of the configured patch and batch sizes (no data loading is timed)."""
    parser = parse_bundle(config_files, overrides)
    method = parser.get_parsed_content("network")
    optimizer = parser.get_parsed_content("optimizer")
    device = parser.get_parsed_content("device")
    channels, patch = parser.get_parsed_content("in_channels"), list(parser["patch_size"])
    generator = torch.Generator().manual_seed(0)
    labeled_batch, unlabeled_batch = (
        parser["train#dataloader#batch_size"],
        parser["train#unlabeled_dataloader#batch_size"],
    )
    labeled = {
        "image": torch.randn(labeled_batch, channels, *patch, generator=generator),
        "label": (torch.rand(labeled_batch, 1, *patch, generator=generator) > 0.7).float(),
    }
    unlabeled = {"image": torch.randn(unlabeled_batch, channels, *patch, generator=generator)}
    total = warmup + iterations
    trainer = SSLTrainer(
        device=device,
        max_iterations=total,
        max_epochs=total,
        train_data_loader=[labeled],
        method=method,
        optimizer=optimizer,
        unlabeled_data_loader=[unlabeled] if method.uses_unlabeled else None,
        precision=parser["train#trainer#precision"],
        cpu_allocator_cache=bool(parser["train#trainer#cpu_allocator_cache"]),
    )
    stamps: List[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: stamps.append(time.perf_counter()))
    if torch.cuda.is_available():
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: torch.cuda.synchronize())
    start = time.perf_counter()
    trainer.run()
    stamps = [start] + stamps
    timed = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])]
    result = {"seconds_per_iteration": sum(timed) / len(timed), "iterations_timed": len(timed)}
    result["precision"] = trainer.precision
    result["peak_rss_gib"] = peak_rss_gib()
    if torch.cuda.is_available():
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def time_inference(
    config_files: Sequence[str],
    overrides: Dict[str, Any],
    volume_shape: Sequence[int],
    strides: Sequence[int],
    optimize_network: bool = True,
) -> Dict[str, float]:
    """Seconds and peak memory to segment one random volume with the bundle's ensemble through MONAI's
    ``SlidingWindowInferer`` at the given strides (overlaps chosen so MONAI's window grid has exactly them), with the
    inference rewrite of ``configs/inference.json`` (``optimize_network``) or without it, under the configured
    ``validate#precision``."""
    parser = parse_bundle(config_files, overrides)
    device = parser.get_parsed_content("device")
    network = parser.get_parsed_content("network_def").to(device).eval()
    if optimize_network:
        optimize_for_inference(network)
    predictor = AutocastInference(network, parser.get_parsed_content("validate#precision"), device)
    patch = list(parser["patch_size"])
    inferer = SlidingWindowInferer(
        roi_size=patch,
        sw_batch_size=parser["validate#inferer#sw_batch_size"],
        overlap=strides_to_overlap(patch, strides),
        sw_device=device,
        device="cpu",
    )
    volume = torch.randn(
        1, parser.get_parsed_content("in_channels"), *volume_shape, generator=torch.Generator().manual_seed(0)
    )
    start = time.perf_counter()
    with torch.no_grad():
        output = inferer(volume, predictor)
    seconds = time.perf_counter() - start
    result = {"seconds_per_volume": seconds, "peak_rss_gib": peak_rss_gib(), "output_shape": list(output.shape)}
    result["precision"] = predictor.precision
    if torch.cuda.is_available():
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def run_isolated(kind: str, module: str = "benchmarking.runs", **kwargs: Any) -> Dict[str, Any]:
    """Run one probe, the function ``kind`` of ``module``, in a fresh Python process so its peak memory is its own."""
    command = [sys.executable, "-c", "import importlib,json,sys; b=importlib.import_module(sys.argv[2]); "
               "a=json.loads(sys.argv[1]); print('RESULT'+json.dumps(getattr(b, a.pop('kind'))(**a)))",
               json.dumps({"kind": kind, **kwargs}), module]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{kind} probe failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    out = result.stdout
    return json.loads([line for line in out.splitlines() if line.startswith("RESULT")][-1][len("RESULT") :])


def write_json(record: Dict[str, Any], output_dir: str, name: str) -> str:
    """Write ``record`` to ``output_dir/name.json`` atomically; return the path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(record, handle, indent=4)
        handle.write("\n")
    os.replace(tmp, path)
    return path


#: the benchmark trains on the first 60 cases of LA's ``train.list`` and tests on the rest (``docs/RESULTS.md``).
BENCHMARK_TRAIN_CASES = 60


def split_lists(
    dataset_dir: str,
    list_file: str,
    train_cases: int,
    run_dir: str,
    labeled_cases: Optional[Sequence[str]] = None,
    test_cases: Optional[int] = None,
) -> Dict[str, str]:
    """Write the benchmark split: the first ``train_cases`` of the list train (first K labeled), the rest test.

    ``test_cases`` (a validation split) tests on the next ``test_cases`` cases only, which must stay within the
    first :data:`BENCHMARK_TRAIN_CASES`: the benchmark's test cases are never used to choose a setting.

    ``labeled_cases`` (training cases) are moved to the front of the written train list, in the given order, the
    other training cases following in list order, so that they are the first K (labeled) of a run with K =
    ``len(labeled_cases)``; the test cases are unchanged."""
    from bundle.data.datalists import read_case_list

    cases = read_case_list(os.path.join(dataset_dir, list_file) if not os.path.isabs(list_file) else list_file)
    if len(cases) <= train_cases:
        raise ValueError(f"{list_file}: {len(cases)} cases, need more than train_cases={train_cases}.")
    train = cases[:train_cases]
    test = cases[train_cases:]
    if test_cases is not None:
        if test_cases < 1 or train_cases + test_cases > BENCHMARK_TRAIN_CASES:
            raise ValueError(
                f"{list_file}: a validation split tests on cases {train_cases}..{train_cases + test_cases - 1}; it "
                f"must hold at least one case and stay within the first {BENCHMARK_TRAIN_CASES} (the rest are the "
                "benchmark's test cases, never used to choose a setting)."
            )
        test = cases[train_cases : train_cases + test_cases]
    if labeled_cases is not None:
        outside = [case for case in labeled_cases if case not in train]
        if outside or len(set(labeled_cases)) != len(labeled_cases):
            raise ValueError(
                f"{list_file}: labeled cases must be distinct training cases (first {train_cases}); "
                f"not training cases: {outside}, given: {list(labeled_cases)}."
            )
        train = list(labeled_cases) + [case for case in train if case not in labeled_cases]
    os.makedirs(run_dir, exist_ok=True)
    paths = {"train": os.path.join(run_dir, "train.list"), "test": os.path.join(run_dir, "test.list")}
    for name, subset in (("train", train), ("test", test)):
        with open(paths[name], "w") as handle:
            handle.write("\n".join(subset) + "\n")
    return paths


def bundle_command(run_id: str, config_files: Sequence[str], overrides: Dict[str, Any]) -> List[str]:
    """The ``python -m monai.bundle run`` command line for ``config_files`` and ``overrides``."""
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", json.dumps(list(config_files))]
    for key, value in overrides.items():
        command += [f"--{key}", value if isinstance(value, str) else repr(value).replace(" ", "")]
    return command


def display_command(command: List[str]) -> str:
    """``command`` as a shell line to rerun from the bundle root: ``python`` for the interpreter, paths under the
    current folder made relative."""
    root = os.getcwd() + os.sep
    return shlex.join(["python"] + [part.replace(root, "") for part in command[1:]])


def run_logged(command: List[str], log_path: str, cwd: Optional[str] = None) -> float:
    """Run ``command`` (in the folder ``cwd``, default the current one) with stdout and stderr appended to
    ``log_path``; return its wall time in seconds."""
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    if result.returncode != 0:
        raise RuntimeError(f"command failed with exit code {result.returncode}; see {log_path}")
    return time.perf_counter() - start


#: nested settings a record keeps besides the top-level ones (the optimiser, schedule, batches and trainer).
RECORDED_SETTINGS = (
    "optimizer#lr",
    "optimizer#momentum",
    "optimizer#weight_decay",
    "lr_scheduler#milestones",
    "lr_scheduler#gamma",
    "train#dataloader#batch_size",
    "train#unlabeled_dataloader#batch_size",
    "train#preprocessing#augment",
    "train#trainer#precision",
    "train#trainer#cpu_allocator_cache",
)


def method_configs(method: str, protocol: str) -> List[str]:
    """Config files of one benchmark run, in merge order: base, LA preset, method preset, protocol preset."""
    files = [
        f"{CONFIG_DIR}/train.json",
        f"{CONFIG_DIR}/datasets/la.json",
        f"{CONFIG_DIR}/methods/{method}.json",
        f"{CONFIG_DIR}/benchmark/la_{protocol}.json",
    ]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"unknown method or protocol: {missing} not found (run from the bundle root)")
    return files


def protocol_overrides(configs: Sequence[str]) -> Dict[str, Any]:
    """``--method#<arg>`` overrides from the protocol file's ``method_args`` (the last of ``configs``), for the
    arguments the configured method takes (e.g. ``rampup_iters`` for the methods that have a ramp); the others do
    not apply to that method, as in the records made before methods held their own arguments."""
    parser = parse_bundle(configs, {})
    taken = method_parameters(parser["method#_target_"])
    return {f"method#{k}": v for k, v in parser.get().get("method_args", {}).items() if k in taken}


def json_value(value: Any) -> Any:
    """``value`` as JSON (tuples become lists); ``TypeError`` when it is not JSON data (a module, a tensor)."""
    return json.loads(json.dumps(value))


def resolved_hyperparameters(parser: ConfigParser) -> Dict[str, Any]:
    """The settings of a parsed bundle with references, expressions and defaults resolved, for a record.

    Top-level values (``"@max_iterations"`` becomes its number; components and non-JSON expressions are left out),
    the optimiser, LR schedule, batch sizes and trainer settings, and ``method``: its class and every argument
    (:func:`~bundle.config.unread_keys.method_parameters`) with the value the built method uses (a ``None`` default
    such as ``rampup_iters`` as the attribute it resolves to), networks left out.
    """
    values: Dict[str, Any] = {}
    for key, raw in parser.get().items():
        if key in ("imports", "initialize", "run", "training") or key.startswith("_") or isinstance(raw, dict):
            continue
        try:
            values[key] = json_value(
                parser.get_parsed_content(key) if isinstance(raw, str) and raw[:1] in "@$" else raw
            )
        except TypeError:
            continue
    for key in RECORDED_SETTINGS:
        values[key] = json_value(parser.get_parsed_content(key))
    method = parser.get_parsed_content("method")
    arguments: Dict[str, Any] = {"_target_": parser["method#_target_"]}
    for name, param in method_parameters(parser["method#_target_"]).items():
        value = parser.get_parsed_content(f"method#{name}") if name in parser["method"] else param.default
        if value is None:
            value = getattr(method, name, None)
        try:
            arguments[name] = json_value(value)
        except TypeError:
            continue  # a network
    values["method"] = arguments
    return values


def read_metrics(eval_dir: str) -> Dict[str, Any]:
    """Per-case rows and the summary written by the evaluation overlay (``metrics.csv``, ``summary.json``):
    ``summary`` maps each metric (``dice``, ``jaccard``, ``hd95``, ``asd``, ...) to its ``mean``, ``std`` and ``n``."""
    import csv

    with open(os.path.join(eval_dir, "metrics.csv")) as handle:
        rows = [{k: (v if k == "case" else float(v)) for k, v in row.items()} for row in csv.DictReader(handle)]
    with open(os.path.join(eval_dir, "summary.json")) as handle:
        summary = json.load(handle)
    return {
        "per_case": rows,
        "summary": summary["metrics"],
        "num_cases": summary["num_cases"],
        "empty_predictions": summary["empty_predictions"],
    }


def run_settings(
    configs: Sequence[str], dataset_dir: str, run_dir: str, num_labeled: int, seed: int, overrides: Dict[str, Any]
) -> Dict[str, Any]:
    """The bundle overrides that train one benchmark run: its split lists (``run_dir/train.list``, written by
    :func:`split_lists`), ``run_dir/models``, the protocol's method arguments, no validation during training. Its
    evaluation uses the same with ``datalists#val_list`` set to ``run_dir/test.list`` and its own ``output_dir``."""
    return {
        "dataset_dir": os.path.relpath(dataset_dir),
        "datalists#train_list": os.path.join(run_dir, "train.list"),
        "num_labeled": num_labeled,
        "seed": seed,
        "model_dir": os.path.join(run_dir, "models"),
        **protocol_overrides(configs),
        **overrides,
        "datalists#val_list": None,
        "output_dir": run_dir,
    }


def rescoring_settings(record: str) -> Tuple[Dict[str, Any], List[str], Dict[str, Any], str]:
    """What scoring an accuracy record's final model again needs: ``(record content, config files, overrides with
    the test cases as the validation list, run folder)``. Raises ``ValueError`` for another kind of record and
    ``FileNotFoundError`` when the run's model or split lists are not on this machine."""
    with open(record) as handle:
        source = json.load(handle)
    if source.get("kind") != "accuracy":
        raise ValueError(f"{record}: not an accuracy record (kind {source.get('kind')!r}).")
    model_dir = source["config"]["model_dir"]
    run_dir = os.path.dirname(model_dir)
    needed = [os.path.join(model_dir, "model.pt")] + [os.path.join(run_dir, f"{s}.list") for s in ("train", "test")]
    missing = [path for path in needed if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"{record}: the run's files are not here: {missing} (train it first).")
    configs = method_configs(source["method"], source["protocol"])
    overrides = run_settings(configs, source["config"]["dataset_dir"], run_dir, source["num_labeled"],
                             source["seed"], source.get("overrides", {}))  # fmt: skip
    overrides["datalists#val_list"] = os.path.join(run_dir, "test.list")
    return source, configs, overrides, run_dir


def rescored_header(kind: str, record: str, source: Dict[str, Any], command: str) -> Dict[str, Any]:
    """The first fields of a record made by scoring the model of the accuracy record ``record`` (content
    ``source``) again: its kind, the record and model it comes from, this commit, hardware and ``command``."""
    return {
        "kind": kind,
        "record": os.path.relpath(record),
        "method": source["method"],
        "variant": source.get("variant", ""),
        "protocol": source["protocol"],
        "num_labeled": source["num_labeled"],
        "seed": source["seed"],
        "model_commit": source["commit"],
        "commit": git_commit(),
        "hardware": hardware(),
        "command": command,
    }


def check_training_precision(parser: ConfigParser) -> None:
    """Refuse, before any work, a benchmark that would train in emulated bf16
    (:func:`~bundle.engine.precision.emulated_bf16`): the ``cpu`` protocol trains in bf16 autocast, which a CPU
    without native bf16 runs tens of times slower than fp32; its fp32 runs are their own variant."""
    device = parser.get_parsed_content("device")
    if emulated_bf16(resolve_precision(parser.get_parsed_content("train#trainer#precision"), device), device):
        raise BundleError(
            "this protocol trains in bf16 autocast, which this CPU (no AVX-512 BF16 / AMX) emulates tens of times "
            "slower than fp32: add --variant fp32 --train#trainer#precision fp32 (records of that variant are "
            "compared with the reference's fp32 runs)."
        )


def accuracy(
    dataset_dir: str,
    method: str = "dual_journal",
    protocol: str = "cpu",
    num_labeled: int = 8,
    list_file: str = "train.list",
    train_cases: int = 60,
    seed: int = 1337,
    results_dir: str = "docs/results",
    runs_dir: str = "runs/benchmark",
    retrain: bool = False,
    variant: str = "",
    notes: str = "",
    labeled_cases: Optional[Sequence[str]] = None,
    test_cases: Optional[int] = None,
    **overrides: Any,
) -> str:
    """Train ``method`` on LA under ``protocol`` and score the final weights on the held-out cases.

    Split: the first ``train_cases`` cases of ``list_file`` train (the first ``num_labeled`` labeled, the rest
    unlabeled); the remaining cases are the test set. No validation runs during training and no checkpoint is
    chosen: the last iteration's weights are scored (the papers' protocol). A finished training is reused unless
    ``retrain``; an interrupted one resumes from its newest interval checkpoint (:mod:`benchmarking.resume`).
    ``overrides`` are passed to every bundle command (e.g. ``--loss_weights#pgl 0``); an ablation names itself with
    ``variant`` (e.g. ``no_pgl``), which goes into the record's name and the report's method column.
    ``notes`` (e.g. how the machine was shared during training) go into the record and the report.
    ``labeled_cases`` (``num_labeled`` training cases) replace the first ``num_labeled`` as the labeled set (the
    payoff experiment of ``scripts/rank_payoff.py``); such a run needs a ``variant`` and its record lists them.
    ``test_cases`` makes a validation run for choosing settings: train on the first ``train_cases`` (e.g. 48), test
    on the next ``test_cases`` (e.g. 12), never on the benchmark's test cases; its name starts with
    ``la_<protocol>_val<train_cases>_`` and its record says ``"evaluation": "validation"`` (write it to its own
    ``results_dir``, e.g. ``docs/results/validation``, reported in its own section).
    Writes ``<results_dir>/<name>.json``; returns its path.
    """
    if overrides and not variant:
        raise ValueError(f"overrides {sorted(overrides)} change the method: name the run with --variant.")
    if isinstance(labeled_cases, str):  # fire passes an unparsable list through as text
        raise ValueError(
            f'labeled_cases must be a list of case names, e.g. \'["a","b"]\'; got the text {labeled_cases}.'
        )
    if labeled_cases is not None:
        labeled_cases = list(labeled_cases)
        if not variant or len(labeled_cases) != num_labeled:
            raise ValueError(
                f"labeled_cases {labeled_cases}: need a --variant name and num_labeled={num_labeled} cases."
            )
    split = f"val{train_cases}_" if test_cases is not None else ""
    name = f"la_{protocol}_{split}{method}{'_' + variant if variant else ''}_k{num_labeled}_seed{seed}"
    run_dir = os.path.relpath(os.path.join(runs_dir, name))  # records keep repository-relative paths
    configs = method_configs(method, protocol)
    train_overrides = run_settings(configs, dataset_dir, run_dir, num_labeled, seed, overrides)
    parser = parse_bundle(configs, train_overrides)
    check_training_precision(parser)
    lists = split_lists(dataset_dir, list_file, train_cases, run_dir, labeled_cases, test_cases)
    log_path = os.path.join(run_dir, "benchmark.log")
    info_path = os.path.join(run_dir, "train_info.json")
    train_command = bundle_command("training", configs, train_overrides)
    if retrain or not os.path.isfile(info_path):
        commit = git_commit()  # the code that trains: taken before training, as HEAD may move during a long run
        if retrain and os.path.isfile(info_path):
            os.remove(info_path)  # an interrupted retraining must not pass for the earlier, finished one
        resume_from = start_part(run_dir, train_command, commit, hardware(), retrain)  # an interrupted one continues
        part_command = train_command
        if resume_from is not None:
            part_command = bundle_command("training", configs, {**train_overrides, "resume_from": resume_from})
        seconds = run_logged(part_command, log_path)
        timing = finish_part(run_dir, seconds, int(parser.get_parsed_content("max_iterations")))
        first = read_parts(run_dir)[0]
        write_json({**timing, "hardware": first["hardware"], "commit": first["commit"]}, run_dir, "train_info")
    with open(info_path) as handle:
        train_info = json.load(handle)
    eval_dir = os.path.join(run_dir, "eval")
    eval_overrides = {**train_overrides, "datalists#val_list": lists["test"], "output_dir": eval_dir}
    run_logged(bundle_command("run", configs + [f"{CONFIG_DIR}/evaluate.json"], eval_overrides), log_path)
    hyperparameters = resolved_hyperparameters(parser)
    record = {
        "kind": "accuracy",
        "method": method,
        "variant": variant,
        "overrides": overrides,
        "protocol": protocol,
        "num_labeled": num_labeled,
        "split": f"train: first {train_cases} of {list_file} ({num_labeled} labeled); test: the remaining cases",
        "evaluation": "test",
        "test_cases": open(lists["test"]).read().split(),
        "command": display_command(train_command),
        "commit": train_info["commit"],
        "hardware": train_info["hardware"],
        "seed": seed,
        "config": hyperparameters,
        "train_seconds": train_info["train_seconds"],
        "notes": " ".join(filter(None, [notes or train_info.get("notes", ""), resumed_note(train_info)])),
        **read_metrics(eval_dir),
    }
    if "train_parts" in train_info:
        record["train_parts"] = train_info["train_parts"]
    if test_cases is not None:
        record["evaluation"] = "validation"
        record["split"] = (
            f"train: first {train_cases} of {list_file} ({num_labeled} labeled); validation: the next {test_cases}"
        )
    if labeled_cases is not None:
        record["labeled_cases"] = labeled_cases
        record["split"] = (
            f"train: first {train_cases} of {list_file} (labeled: labeled_cases); test: the remaining cases"
        )
    return write_json(record, results_dir, name)


#: The authors' released code timed per kind of CPU (:func:`cpu_kind`: vendor and AVX-512 / BF16 / AMX flags; 2
#: threads, batch 2+2; measured by the project, ``../shared/specs/reference_speed.md``): median seconds and peak RSS
#: (GiB) per probe. Compare a figure of ours only with those of the same kind of CPU.
AUTHORS_REFERENCE: Dict[str, Dict[str, Any]] = {
    "AMD, AVX2, no AVX-512": {
        "measured": "2026-11-22",
        "seconds": {"train_64x64x32": 8.8, "train_112x112x80": 92.3, "infer_175x132x88": 122.0},
        "peak_gib": {"train_64x64x32": 2.4, "train_112x112x80": 12.8, "infer_175x132x88": 3.2},
    },
    "AMD, AVX-512 BF16": {
        "measured": "2026-12-02, mean of the two same-run timings of the speed records at 08292f1 and 17c3f82",
        "seconds": {"train_64x64x32": 2.93, "train_112x112x80": 39.2, "infer_175x132x88": 53.8},
        "peak_gib": {"train_64x64x32": 2.4, "train_112x112x80": 12.5, "infer_175x132x88": 3.1},
    },
    "Intel, AVX-512 BF16 + AMX": {
        "measured": "2026-12-01",
        "seconds": {"train_64x64x32": 4.6, "train_112x112x80": 55.4, "infer_175x132x88": 64.5},
        "peak_gib": {"train_64x64x32": 2.5, "train_112x112x80": 13.0, "infer_175x132x88": 3.2},
    },
}


def reference_machine(vendor: str, flags: Sequence[str]) -> Optional[str]:
    """The :data:`AUTHORS_REFERENCE` key of a CPU of ``vendor`` (a ``vendor_id`` or model name) with ``flags``, or
    ``None`` when the authors' code was not timed on that kind of CPU."""
    kind = cpu_kind(vendor, flags)
    return kind if kind in AUTHORS_REFERENCE else None


def speed_reference(record: Dict[str, Any]) -> Tuple[str, Optional[Dict[str, Any]]]:
    """The kind of CPU a speed record ran on (:func:`cpu_kind` of its ``cpu`` fields) and the authors' figures it is
    compared with: those timed in the same run (a ``reference`` read by :func:`same_run_reference`, which names the
    ``cpu_model``) or :data:`AUTHORS_REFERENCE`'s for that kind (none for a GPU record, or one that did not record
    its CPU flags)."""
    cpu = record.get("cpu")
    kind = cpu_kind(cpu.get("vendor") or cpu["model"], cpu["flags"]) if cpu else "CPU flags not recorded"
    if "cpu_model" in (record.get("reference") or {}):
        return f"{kind}, timed in this run", record["reference"]
    figures = AUTHORS_REFERENCE.get(kind) if record["device"] == "cpu" else None
    return (kind if figures else f"{kind}: no figure"), figures


def same_run_reference(path: str) -> Dict[str, Any]:
    """The authors' figures from a ``bench_reference.py`` output (``train[<D>x<H>x<W>]``: median seconds and peak
    RSS; ``inference``: seconds and peak RSS of their ``test_single_case``, its 45 windows as in our
    ``infer_175x132x88`` probe), in the form of :data:`AUTHORS_REFERENCE` plus where they come from."""
    with open(path) as handle:
        bench = json.load(handle)
    failed = [key for key, value in [*bench.get("train", {}).items(), ("inference", bench.get("inference", {}))]
              if "error" in value]  # fmt: skip
    if failed or not bench.get("train"):
        raise ValueError(f"{path}: the authors' code did not run for {failed or 'training'}; see its output.")
    seconds = {f"train_{size}": value["median_s"] for size, value in bench["train"].items()}
    peak = {f"train_{size}": round(value["peak_rss_mb"] / 1024, 2) for size, value in bench["train"].items()}
    if "inference" in bench:
        seconds["infer_175x132x88"] = bench["inference"]["seconds"]
        peak["infer_175x132x88"] = round(bench["inference"]["peak_rss_mb"] / 1024, 2)
    return {"measured": bench["date_utc"], "seconds": seconds, "peak_gib": peak, "cpu_model": bench["cpu_model"],
            "threads": bench["threads"], "load_before_after": [bench["loadavg_before"], bench["loadavg_after"]],
            "source_commits": {repo: src["commit"] for repo, src in bench["sources"].items()}}  # fmt: skip


def speed_arguments(**given: Any) -> str:
    """The command-line flags of :func:`speed` among ``given`` (its arguments by name) that differ from its defaults,
    so a record's command reproduces the run."""
    defaults = inspect.signature(speed).parameters
    flags = ""
    for name, value in given.items():
        plain = json.loads(json.dumps(value))  # tuples and lists alike
        if plain != json.loads(json.dumps(defaults[name].default)):
            if isinstance(plain, list):
                text = json.dumps(plain).replace(" ", "")
                flags += f' --{name} "{text}"'
            else:
                flags += f" --{name} {str(plain).lower() if isinstance(plain, bool) else plain}"
    return flags


def training_speed_variants(
    checkpointing_default: bool, with_baselines: bool, on_cpu: bool, low_precision: bool
) -> Dict[str, Dict[str, Any]]:
    """The training probes of :func:`speed`, by name: the bundle's defaults first (named by their activation
    checkpointing, ``checkpointing_default``, which is explicit in every variant so a row's name always says what
    ran); with ``with_baselines`` also the other checkpointing setting, the CPU allocator cache (``on_cpu``) and fp32
    (where ``auto`` resolves to a lower precision), each on top of the defaults."""

    def name(checkpointing: bool) -> str:
        return "activation checkpointing" if checkpointing else "activations kept"

    default = {"activation_checkpointing": checkpointing_default}
    variants = {name(checkpointing_default): default}
    if with_baselines:
        variants[name(not checkpointing_default)] = {"activation_checkpointing": not checkpointing_default}
        if on_cpu:  # the allocator cache is a CPU setting
            variants[name(checkpointing_default) + " + allocator cache"] = {
                **default,
                "train#trainer#cpu_allocator_cache": True,
            }
        if low_precision:
            variants[name(checkpointing_default) + ", fp32"] = {**default, "train#trainer#precision": "fp32"}
    return variants


def speed(
    method: str = "dual_journal",
    patches: Sequence[Sequence[int]] = ((64, 64, 32), (112, 112, 80)),
    volume: Sequence[int] = (175, 132, 88),
    inference_patch: Sequence[int] = (112, 112, 80),
    strides: Sequence[int] = (18, 18, 4),
    iterations: int = 3,
    with_baselines: bool = True,
    results_dir: str = "docs/results",
    reference_json: Optional[str] = None,
) -> str:
    """Training seconds/iteration and peak memory per patch size (batch 2+2), and inference seconds and peak memory
    for one volume at the given strides, each probe in its own process. The bundle's defaults (``precision`` auto,
    train.json's activation checkpointing, the inference rewrite) are timed; ``with_baselines`` also times the other
    checkpointing setting, plain-eager inference, fp32 where auto is not fp32, and training with the CPU allocator
    cache (:func:`training_speed_variants`), in the same run, so each trade-off is measured on the same machine
    state; a training row's ``defaults`` says whether it ran train.json's settings. ``reference_json``: the output of
    ``../shared/tools/reference_bench/bench_reference.py`` timed on this machine just before (the authors' code in
    the same run), used as the reference instead of the stored figures for the CPU model. Writes
    ``speed_<device>_<cpu model>_<method>_<commit>.json`` with the CPU model, its bf16/AMX flags, the precision of
    every row and the authors' figures (``reference``, null with a ``reference_note`` when there are none)."""
    same_run = same_run_reference(reference_json) if reference_json else None  # a bad file fails before timing
    configs = [f"{CONFIG_DIR}/train.json", f"{CONFIG_DIR}/methods/{method}.json"]
    device = "gpu" if torch.cuda.is_available() else "cpu"
    low_precision = resolve_precision("auto", "cuda" if device == "gpu" else "cpu") != "fp32"
    training_variants = training_speed_variants(
        bool(parse_bundle(configs, {})["activation_checkpointing"]), with_baselines, device == "cpu", low_precision
    )
    inference_variants: Dict[str, Dict[str, Any]] = {"norms folded, channels-last": {}}  # inference.json's
    if with_baselines:
        inference_variants["plain eager"] = {"optimize_network": False}
        if low_precision:
            inference_variants["norms folded, channels-last, fp32"] = {"validate#precision": "fp32"}
    rows = []
    for patch in patches:
        for variant, settings in training_variants.items():
            overrides = {"patch_size": list(patch), **settings}
            result = run_isolated("time_training", config_files=configs, overrides=overrides, iterations=iterations)
            rows.append({"probe": "train_" + "x".join(map(str, patch)), "batch": "2+2", "variant": variant,
                         "defaults": variant == next(iter(training_variants)), **result})  # fmt: skip
    for variant, settings in inference_variants.items():
        overrides = {"patch_size": list(inference_patch), **settings}
        optimize = overrides.pop("optimize_network", True)
        result = run_isolated("time_inference", config_files=configs, overrides=overrides, volume_shape=list(volume),
                              strides=list(strides), optimize_network=optimize)  # fmt: skip
        rows.append({"probe": "infer_" + "x".join(map(str, volume)), "strides": list(strides), "variant": variant,
                     **result})  # fmt: skip
    cpu = cpu_description()
    machine = cpu["kind"] if device == "cpu" else None
    given = dict(patches=patches, volume=volume, inference_patch=inference_patch, strides=strides,
                 iterations=iterations, with_baselines=with_baselines)  # fmt: skip
    command = f"python scripts/benchmark.py speed --method {method}" + speed_arguments(**given)
    reference = AUTHORS_REFERENCE.get(machine) if machine else None
    if same_run:
        reference = same_run
        machine = f"{cpu['kind']}, timed in this run"
        command += f" --reference_json {os.path.relpath(reference_json)}"
    record = {"kind": "speed", "method": method, "device": device, "command": command, "commit": git_commit(),
              "hardware": hardware(), "cpu": cpu, "reference_machine": machine, "reference": reference,
              "rows": rows}  # fmt: skip
    if reference is None:
        record["reference_note"] = f"the authors' code has no figure for {machine or device}; time it with "
        record["reference_note"] += "../shared/tools/reference_bench on this machine to compare"
    slug = re.sub(r"[^a-z0-9]+", "_", cpu["model"].lower()).strip("_")
    # one record per commit: a later run (these VMs drift) never overwrites an earlier commit's measurement
    return write_json(record, results_dir, f"speed_{device}_{slug}_{method}_{record['commit'][:7]}")


def inference_memory(
    volume: Sequence[int] = (512, 512, 300),
    patch: Sequence[int] = (128, 128, 96),
    strides: Sequence[int] = (128, 128, 96),
    ckpt_path: str = "models/model.pt",
    work_dir: str = "runs/benchmark/inference_memory",
    results_dir: str = "docs/results",
) -> str:
    """Peak resident memory of the whole ``configs/inference.json`` command (load, preprocess, sliding window with
    CPU stitching, inversion, writing) on one synthetic CT-sized int16 NIfTI volume, measured as the child process's
    ``ru_maxrss``. The stitching buffers depend on the volume, not on the stride, so the default strides equal the
    patch (fewest windows) to keep the probe short. Writes ``memory_<device>_<shape>.json``."""
    import nibabel as nib
    import numpy as np

    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"{ckpt_path}: train first (the README's first command writes models/model.pt).")
    image_dir = os.path.join(work_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    shape_name = "x".join(map(str, volume))
    image_path = os.path.join(image_dir, f"ct_{shape_name}.nii.gz")
    if not os.path.isfile(image_path):
        values = np.random.default_rng(0).integers(-1000, 1500, size=tuple(volume), dtype=np.int16)
        nib.save(nib.Nifti1Image(values, np.diag([0.7, 0.7, 1.0, 1.0])), image_path + ".tmp.nii.gz")
        os.replace(image_path + ".tmp.nii.gz", image_path)
    overrides = {"dataset_dir": image_dir, "output_dir": os.path.join(work_dir, "out"), "ckpt_path": ckpt_path,
                 "patch_size": list(patch), "sw_strides": list(strides), "sw_batch_size": 1}  # fmt: skip
    command = bundle_command("run", [f"{CONFIG_DIR}/inference.json"], overrides)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    seconds = run_logged(command, os.path.join(work_dir, "inference.log"))
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib <= before:
        raise RuntimeError("the inference process did not set a new peak; run this probe in a fresh process.")
    device = "gpu" if torch.cuda.is_available() else "cpu"
    record = {"kind": "memory", "device": device, "volume": list(volume), "patch": list(patch),
              "strides": list(strides), "peak_rss_gib": peak_kib / 2**20, "seconds": seconds,
              "command": f"python scripts/benchmark.py memory --volume \"{list(volume)}\"", "commit": git_commit(),
              "hardware": hardware()}  # fmt: skip
    return write_json(record, results_dir, f"memory_{device}_{shape_name}")
