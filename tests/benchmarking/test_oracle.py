"""The external oracle (``benchmarking/oracle.py``): half-resolution case writer, split, script patches.

The patches are checked on hand-made stand-in scripts that hold the same anchors as the authors' scripts (their code
is not stored here) and are executed, so the values the patched code computes are asserted. The run of the real
patched script is a probe, skipped unless ``ORACLE_PROBE=1`` and the UA-MT git mirror (``UA_MT_MIRROR``) exist.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from benchmarking.oracle import (
    Patch,
    Protocol,
    apply_patch,
    oracle,
    oracle_split,
    protocol_settings,
    script_arguments,
    script_patches,
    step_times,
    training_log,
    weights_name,
    write_half_resolution,
    write_stubs,
)
from bundle.losses.ramps import stepped_rampup
from tests.conftest import raises_bundle_error
from tests.peer_helpers import poisoned_la_dataset

#: a protocol with small numbers, so that every milestone and the whole ramp fall inside a short loop.
SMALL = Protocol(
    patch_size=(8, 8, 4),
    labeled_batch=2,
    unlabeled_batch=2,
    max_iterations=14,
    lr=0.01,
    milestones=(5, 9),
    gamma=0.1,
    rampup_iters=10,
    rampup_step=3,
    consistency=0.1,
    ema_decay=0.99,
    resample_factor=0.5,
    sw_strides=(4, 4, 2),
)

#: a stand-in for the authors' Mean Teacher script: the anchors the patches look for, in a loop that records what
#: the patched code computes (our code, written for this test).
MEAN_TEACHER_STAND_IN = """
import torch

patch_size = (112, 112, 80)
base_lr = 0.01


def sigmoid_rampup(current, length):
    current = min(max(current, 0.0), length)
    return math.exp(-5.0 * (1.0 - current / length) ** 2)


def get_current_consistency_weight(epoch):
    return 0.1 * sigmoid_rampup(epoch, consistency_rampup)


labeled_idxs = list(range(16))
unlabeled_idxs = list(range(16, 80))
loader = dict(batch_sampler=None, num_workers=4, pin_memory=True)
optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
unlabeled_volume_batch = torch.ones(2, 1, 3, 3, 2)
lrs, weights, kept = [], [], []
iter_num = 0
for step in range(max_iterations):
    if step >= 0:
        T = 8
        preds = torch.zeros([2 * T, 2, 112, 112, 80])
        uncertainty = -1.0*torch.log(torch.full_like(unlabeled_volume_batch, 0.1))
    weights.append(get_current_consistency_weight(iter_num//150))
    kept.append(float((uncertainty < 0.5).float().mean()))
    iter_num = iter_num + 1
    if iter_num % 2500 == 0:
        lr_ = base_lr * 0.1 ** (iter_num // 2500)
        for param_group in optimizer.param_groups:
            param_group['lr'] = lr_
    lrs.append(optimizer.param_groups[0]['lr'])
"""

#: a stand-in for the authors' supervised script (``train_LA.py``): its data subset and its two loop exits.
SUPERVISED_STAND_IN = """
import torch

patch_size = (112, 112, 80)
base_lr = 0.01
optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
dataset = dict(split='train',
               num=16,
               transform=None)
loader = dict(shuffle=True,  num_workers=4)
iter_num = 0
for epoch in range(100):
    for batch in range(4):
        iter_num = iter_num + 1
        if iter_num % 2500 == 0:
            lr_ = base_lr * 0.1 ** (iter_num // 2500)
            for param_group in optimizer.param_groups:
                param_group['lr'] = lr_
        if iter_num > max_iterations:
            break
    if iter_num > max_iterations:
        break
"""


def run_stand_in(text: str, **names) -> dict:
    namespace = {"math": math, **names}
    exec(compile(text, "stand_in.py", "exec"), namespace)
    return namespace


def argument(arguments, name):
    return next(a.split("=", 1)[1] for a in arguments if a.startswith(f"--{name}="))


def test_mean_teacher_patches_give_the_protocol_values():
    """Patched, the stand-in's patch, split, workers, LR per iteration, ramp and consistency mask are the protocol's:
    MultiStepLR stepped after each iteration, our ``stepped_rampup`` with the ramp length passed as their
    ``--consistency_rampup``, and every voxel kept (no uncertainty mask)."""
    assert run_stand_in(MEAN_TEACHER_STAND_IN, max_iterations=2, consistency_rampup=40.0)["kept"] == [0.0, 0.0]
    patched = MEAN_TEACHER_STAND_IN
    for patch in script_patches("mean_teacher", num_labeled=4, train_cases=12, protocol=SMALL):
        patched = apply_patch(patched, patch, "stand_in.py")
    arguments = script_arguments("mean_teacher", "/data/LA", 7, SMALL)
    rampup = float(argument(arguments, "consistency_rampup"))
    names = run_stand_in(patched, max_iterations=SMALL.max_iterations, consistency_rampup=rampup)

    assert names["patch_size"] == (8, 8, 4)
    assert names["labeled_idxs"] == [0, 1, 2, 3] and names["unlabeled_idxs"] == list(range(4, 12))
    assert names["loader"]["num_workers"] == 0
    assert "preds" not in names and names["kept"] == [1.0] * SMALL.max_iterations

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[5, 9], gamma=0.1)
    expected_lrs = []
    for _ in range(SMALL.max_iterations):
        optimizer.step()
        scheduler.step()
        expected_lrs.append(optimizer.param_groups[0]["lr"])
    assert names["lrs"] == pytest.approx(expected_lrs, rel=1e-12)
    assert names["lrs"][3:6] == pytest.approx([0.01, 0.001, 0.001]) and names["lrs"][-1] == pytest.approx(1e-4)

    expected_weights = [0.1 * stepped_rampup(t, 10, 3) for t in range(SMALL.max_iterations)]
    assert names["weights"] == pytest.approx(expected_weights, rel=1e-12)
    assert names["weights"][0] == pytest.approx(0.1 * math.exp(-5)) and names["weights"][-1] == pytest.approx(0.1)

    assert argument(arguments, "batch_size") == "4" and argument(arguments, "labeled_bs") == "2"
    assert argument(arguments, "max_iterations") == "14" and argument(arguments, "seed") == "7"
    assert float(argument(arguments, "base_lr")) == 0.01 and float(argument(arguments, "ema_decay")) == 0.99


def test_supervised_patches_stop_after_max_iterations_on_the_first_k():
    """The stand-in of ``train_LA.py`` runs ``max_iterations + 1`` iterations as released and exactly
    ``max_iterations`` patched, on the first K cases; its weights file is named one iteration later, as theirs."""
    assert run_stand_in(SUPERVISED_STAND_IN, max_iterations=6)["iter_num"] == 7
    patched = SUPERVISED_STAND_IN
    for patch in script_patches("supervised", num_labeled=3, train_cases=12, protocol=SMALL):
        patched = apply_patch(patched, patch, "stand_in.py")
    names = run_stand_in(patched, max_iterations=6)
    assert names["iter_num"] == 6 and names["dataset"]["num"] == 3 and names["loader"]["num_workers"] == 0
    assert names["optimizer"].param_groups[0]["lr"] == pytest.approx(0.001)  # x0.1 at 5, not yet at 9
    assert names["patch_size"] == (8, 8, 4)
    assert argument(script_arguments("supervised", "/d", 1, SMALL), "batch_size") == "2"
    assert weights_name("supervised", 1000) == "iter_1001.pth" and weights_name("mean_teacher", 1000) == "iter_1000.pth"


def test_a_patch_that_does_not_match_stops_naming_the_file_and_the_anchor():
    patch = Patch("labeled cases", "num=16,", "num=8,")
    with raises_bundle_error(r"their.py: expected 1 occurrence\(s\) of 'num=16,', found 0 \(labeled cases\)"):
        apply_patch("num=17,\n", patch, "their.py")
    with raises_bundle_error("found 2"):
        apply_patch("num=16,\nnum=16,\n", patch, "their.py")
    with raises_bundle_error("no 'END' after 'a = 1'"):
        apply_patch("a = 1\nb = 2\n", Patch("span", "a = 1", "c = 3", end="END"), "their.py")
    assert apply_patch("x\n    a = 1\n    b = 2\n    END\ny\n", Patch("span", "a = 1", "c\nd", end="END"), "t") == (
        "x\n    c\n    d\ny\n"
    )


def test_split_is_first_60_train_with_first_k_labeled_and_the_rest_test():
    cases = [f"case{i:02d}" for i in range(80)]
    split = oracle_split(cases, train_cases=60, num_labeled=8)
    assert split["train"] == cases[:60] and split["labeled"] == cases[:8] and split["test"] == cases[60:]
    assert len(split["test"]) == 20
    with raises_bundle_error("num_labeled must be in"):
        oracle_split(cases, 60, 1)
    with raises_bundle_error("need more than train_cases=60"):
        oracle_split(cases[:60], 60, 8)


def test_protocol_settings_are_the_cpu_protocols():
    settings = protocol_settings("cpu")
    assert settings.patch_size == (64, 64, 32) and (settings.labeled_batch, settings.unlabeled_batch) == (2, 2)
    assert settings.max_iterations == 1000 and settings.milestones == (650, 900) and settings.gamma == 0.1
    assert (settings.rampup_iters, settings.rampup_step) == (250, 6) and settings.resample_factor == 0.5
    assert settings.lr == 0.01 and settings.consistency == 0.1 and settings.sw_strides == (9, 9, 2)
    assert protocol_settings("cpu", max_iterations=5).max_iterations == 5


def linear_resample(volume: np.ndarray, size: tuple) -> np.ndarray:
    """Separable linear resampling, half-pixel centres, edges clamped (what trilinear zoom without aligned
    corners computes), written with numpy index arithmetic."""
    out = volume.astype(np.float64)
    for axis, new in enumerate(size):
        old = out.shape[axis]
        source = np.maximum((np.arange(new) + 0.5) * old / new - 0.5, 0.0)
        low = np.floor(source).astype(int)
        high = np.minimum(low + 1, old - 1)
        weight = (source - low).reshape([-1 if a == axis else 1 for a in range(3)])
        out = np.take(out, low, axis=axis) * (1 - weight) + np.take(out, high, axis=axis) * weight
    return out


def test_half_resolution_cases_match_an_independent_zoom(tmp_path):
    """Written copies: image = linear resampling to floor(shape / 2) then z-score (population sd), label = nearest
    (source index floor(i * old / new)), as uint8; one file per case in the LA layout."""
    rng = np.random.default_rng(3)
    image = rng.standard_normal((10, 12, 9)).astype(np.float32) * 3 + 1
    label = np.zeros((10, 12, 9), dtype=np.uint8)
    label[2:7, 3:9, 1:6] = 1
    (tmp_path / "LA" / "caseA").mkdir(parents=True)
    with h5py.File(tmp_path / "LA" / "caseA" / "mri_norm2.h5", "w") as handle:
        handle["image"], handle["label"] = image, label
    write_half_resolution(str(tmp_path / "LA"), ["caseA"], str(tmp_path / "half"), 0.5)
    assert sorted(os.listdir(tmp_path / "half" / "caseA")) == ["mri_norm2.h5"]
    with h5py.File(tmp_path / "half" / "caseA" / "mri_norm2.h5", "r") as handle:
        half_image, half_label = handle["image"][()], handle["label"][()]

    assert half_image.shape == (5, 6, 4) and half_image.dtype == np.float32 and half_label.dtype == np.uint8
    zoomed = linear_resample(image, (5, 6, 4))
    np.testing.assert_allclose(half_image, (zoomed - zoomed.mean()) / zoomed.std(), atol=1e-5)
    picks = [np.floor(np.arange(new) * old / new).astype(int) for old, new in zip((10, 12, 9), (5, 6, 4))]
    np.testing.assert_array_equal(half_label, label[np.ix_(*picks)])
    assert half_label.sum() == 3 * 3 * 2


def test_training_log_and_step_times(tmp_path):
    """Their log's last iteration and loss; the launcher's stamps give the median wall and CPU seconds per iteration
    without the first step (set-up)."""
    log = tmp_path / "log.txt"
    log.write_text(
        "[23:59:58.000] Namespace(seed=1)\n"
        "[23:59:58.500] iteration 1 : loss : 0.900000 cons_dist: 0.0, loss_weight: 0.000674\n"
        "[00:00:02.500] iteration 2 : loss : 0.700000 cons_dist: 0.0, loss_weight: 0.000674\n"
        "[00:00:02.600] save model to ../model/oracle/iter_2.pth\n"
    )
    assert training_log(str(log)) == {"last_iteration": 2, "last_loss": 0.7}
    (tmp_path / "empty.txt").write_text("[00:00:00.000] total 8 samples\n")
    with raises_bundle_error("no 'iteration N : loss' line"):
        training_log(str(tmp_path / "empty.txt"))
    stamps = [[0.0, 0.0], [30.0, 9.0], [32.0, 10.0], [36.0, 11.5], [37.0, 12.0]]
    (tmp_path / "steps.json").write_text(json.dumps({"stamps": stamps, "threads": 1}))
    times = step_times(str(tmp_path / "steps.json"))
    assert times == {"steps": 4, "wall_seconds_per_iteration": 2.0, "cpu_seconds_per_iteration": 1.0, "threads": 1}
    (tmp_path / "steps.json").write_text(json.dumps({"stamps": stamps[:2], "threads": 1}))
    assert step_times(str(tmp_path / "steps.json"))["cpu_seconds_per_iteration"] is None


def test_missing_mirror_or_bad_method_is_named(tmp_path):
    with raises_bundle_error(f"{tmp_path}: no git directory; fetch github:yulequan/UA-MT"):
        oracle(str(tmp_path), str(tmp_path), method="mean_teacher")
    with raises_bundle_error("method 'ua_mt': expected one of"):
        oracle(str(tmp_path), str(tmp_path), method="ua_mt")


#: our stand-in for one of their scripts: ``.cuda()`` calls, their logging/transform imports and optimizer steps.
LAUNCHED_STAND_IN = """
import sys

import torch
from tensorboardX import SummaryWriter
from torchvision import transforms

net = torch.nn.Linear(2, 1).cuda()
optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
x = torch.ones(3, 2).cuda()
SummaryWriter("log").add_scalar("loss", 1.0, 1)
for _ in range(3):
    optimizer.zero_grad()
    net(x).sum().backward()
    optimizer.step()
with open("out.txt", "w") as handle:
    handle.write(f"{transforms.Compose([lambda v: v + 1, lambda v: v * 2])(1)} {x.device.type} {sys.argv[1:]}")
"""


def test_launcher_runs_a_script_on_the_cpu_and_stamps_every_step(tmp_path):
    """The launcher turns ``.cuda()`` into a no-op, provides the stand-ins of missing packages, passes the script its
    arguments, and stamps the start and each of the 3 optimizer steps."""
    write_stubs(str(tmp_path))
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "script.py").write_text(LAUNCHED_STAND_IN)
    command = [sys.executable, str(tmp_path / "launcher.py"), "script.py", "--seed=3"]
    subprocess.run(command, cwd=tmp_path / "code", check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (tmp_path / "code" / "out.txt").read_text() == "4 cpu ['--seed=3']"
    steps = json.loads((tmp_path / "steps.json").read_text())
    assert len(steps["stamps"]) == 4 and steps["threads"] == 1
    assert step_times(str(tmp_path / "steps.json"))["steps"] == 3


MIRROR = os.environ.get("UA_MT_MIRROR", "/work/.mirror/yulequan+UA-MT/repo/.git")


@pytest.mark.skipif(
    os.environ.get("ORACLE_PROBE") != "1" or not os.path.isdir(MIRROR),
    reason="probe of the authors' script: set ORACLE_PROBE=1 and UA_MT_MIRROR (a git dir of yulequan/UA-MT)",
)
@pytest.mark.parametrize("method", ["mean_teacher", "supervised"])
def test_probe_runs_their_patched_script_and_scores_it(tmp_path, method, monkeypatch):
    """2 iterations of the real patched script on tiny cases (4 train, 2 labeled, 1 test), scored by our evaluation."""
    data = poisoned_la_dataset(tmp_path / "LA", None, num_cases=5, num_labeled=2)
    path = oracle(str(data), MIRROR, method=method, num_labeled=2, seed=1, max_iterations=2, train_cases=4,
                  results_dir=str(tmp_path / "results"), runs_dir=str(tmp_path / "runs"))  # fmt: skip
    record = json.loads(Path(path).read_text())
    assert Path(path).name == f"oracle_la_cpu_{method}_it2_k2_seed1.json"
    assert record["kind"] == "oracle" and record["test_cases"] == ["case4"] and record["num_cases"] == 1
    assert [row["case"] for row in record["per_case"]] == ["case4"]
    assert 0.0 <= record["per_case"][0]["dice"] <= 1.0 and len(record["reference"]["commit"]) == 40
    assert record["config"]["max_iterations"] == 2 and record["cpu_seconds_per_iteration"] > 0
