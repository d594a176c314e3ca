"""Exact resume, atomic checkpoints, and never a non-finite model, on tiny synthetic data through train.json.

Resuming from the checkpoint of iteration k (what a run killed after iteration k leaves) must give weights, teacher,
BatchNorm statistics and optimizer state bit-identical to the uninterrupted run: mid-epoch, at an epoch boundary
just after a validation, in BCP's second stage, and after a real ``kill -9`` during a checkpoint write.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from bundle.data.checks import check_resume_file
from bundle.data.synthetic import ensure_synthetic_dataset
from bundle.engine.handlers import ResumeLoader, SaveStateDictOnCompletion
from tests.conftest import REPO_ROOT, raises_bundle_error
from tests.training_helpers import (
    flatten_state,
    make_workflow,
    run_workflow,
    same_value,
    tiny_overrides,
)

#: labeled items and batch sizes per preset: the labeled pass is 2 iterations long (BCP halves its batches, and
#: BatchNorm needs 2 samples), so an odd k is mid-pass; the unlabeled pass is 6 (dual) or 2 (BCP) iterations.
#: Validation every 2 iterations draws from torch's generator just before the even checkpoints.
STREAMS = {
    "dual_journal": {
        "num_labeled": 4,
        "train#dataloader#batch_size": 2,
        "train#unlabeled_dataloader#batch_size": 2,
        "val_interval": 2,
    },
    "bcp": {
        "num_labeled": 8,
        "train#dataloader#batch_size": 4,
        "train#unlabeled_dataloader#batch_size": 4,
        "val_interval": 2,
    },
}
#: preset -> (iterations, checkpoints to resume from); BCP pre-trains for max_iterations // 3 = 2 iterations, so
#: both resume points are in its second stage.
CASES = {"dual_journal": (5, (3, 4)), "bcp": (6, (3, 4))}


@pytest.fixture(scope="module")
def resume_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "resume"
    return ensure_synthetic_dataset(str(root), num_labeled=8, num_unlabeled=8, num_validation=1, shape=(20, 20, 18))


def _overrides(dataset, out, iterations, preset="dual_journal", **extra):
    return tiny_overrides(
        dataset,
        out,
        max_iterations=iterations,
        **{"train#checkpoint_saver#save_interval": 1, **STREAMS[preset], **extra},
    )


def _configs(preset):
    return ["train.json", f"methods/{preset}.json"]


def _final_state(out):
    return torch.load(out / "checkpoints" / "checkpoint_final.pt", weights_only=True)


def _assert_identical(resumed, reference):
    for name in ("method", "optimizer", "lr_scheduler"):
        flat_a, flat_b = flatten_state(resumed[name]), flatten_state(reference[name])
        assert flat_a.keys() == flat_b.keys()
        different = [k for k in flat_a if not same_value(flat_a[k], flat_b[k])]
        assert different == [], f"{name}: {different[:5]} differ"
    assert resumed["trainer"]["iteration"] == reference["trainer"]["iteration"]


def _full_run(dataset, full, preset):
    """The uninterrupted run, keeping the checkpoint of every iteration."""
    iterations = CASES[preset][0]
    overrides = _overrides(dataset, full, iterations, preset, **{"train#checkpoint_saver#n_saved": iterations})
    run_workflow(make_workflow(_configs(preset), overrides))
    return full


@pytest.fixture(scope="module")
def dual_full_run(resume_dataset, tmp_path_factory):
    return _full_run(resume_dataset, tmp_path_factory.mktemp("dual_full"), "dual_journal")


@pytest.mark.parametrize("preset", sorted(CASES))
def test_resume_from_any_checkpoint_is_bit_identical(preset, resume_dataset, request, tmp_path):
    iterations, resume_points = CASES[preset]
    if preset == "dual_journal":
        full = request.getfixturevalue("dual_full_run")  # shared with the kill test
    else:
        full = _full_run(resume_dataset, tmp_path / "full", preset)
    reference = _final_state(full)
    for k in resume_points:
        checkpoint = full / "checkpoints" / f"checkpoint_iteration={k}.pt"
        assert torch.load(checkpoint, weights_only=True)["trainer"]["labeled_stream"]["position"] == (
            2 if k % 2 == 0 else 1
        )
        out = tmp_path / f"resumed_{k}"
        run_workflow(
            make_workflow(
                _configs(preset), _overrides(resume_dataset, out, iterations, preset, resume_from=str(checkpoint))
            )
        )
        _assert_identical(_final_state(out), reference)
        model, reference_model = (torch.load(d / "models" / "model.pt", weights_only=True) for d in (out, full))
        assert all(torch.equal(model[k], reference_model[k]) for k in reference_model)
    if preset == "bcp":
        assert int(reference["method"]["stage"]) == 2


def test_resume_with_loader_workers_is_bit_identical(resume_dataset, tmp_path):
    """With ``num_workers`` > 0 the random crops run in worker processes seeded from torch's generator at the start
    of each pass; restarting the pass from the recorded generators gives the workers the same seeds."""
    iterations, workers = CASES["dual_journal"][0], {"train#dataloader#num_workers": 2}
    full = tmp_path / "full"
    overrides = _overrides(
        resume_dataset, full, iterations, **{"train#checkpoint_saver#n_saved": iterations}, **workers
    )
    run_workflow(make_workflow(_configs("dual_journal"), overrides))
    checkpoint = full / "checkpoints" / "checkpoint_iteration=3.pt"  # mid-pass
    out = tmp_path / "resumed"
    overrides = _overrides(resume_dataset, out, iterations, resume_from=str(checkpoint), **workers)
    run_workflow(make_workflow(_configs("dual_journal"), overrides))
    _assert_identical(_final_state(out), _final_state(full))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dual_isbi_is_deterministic_for_a_fixed_seed(resume_dataset, tmp_path, precision):
    """Two runs of the same seed give bit-identical weights, also under bf16 autocast with 16-channel layers (where
    the guarded small-depth convolutions run)."""
    states = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        settings = {"base_width": 16, "max_iterations": 2, "train#trainer#precision": precision}
        run_workflow(make_workflow(_configs("dual_isbi"), tiny_overrides(resume_dataset, out, **settings)))
        states.append(_final_state(out))
    _assert_identical(states[1], states[0])


KILL_DURING_SAVE = """
import json, os, signal, sys
sys.path.insert(0, {root!r})
real_replace = os.replace

def replace(source, target):
    if target.endswith("checkpoint_iteration=3.pt"):
        os.kill(os.getpid(), signal.SIGKILL)  # the new checkpoint is written, not yet renamed
    real_replace(source, target)

os.replace = replace
from pathlib import Path
from tests.training_helpers import make_workflow, run_workflow
run_workflow(make_workflow(json.loads(sys.argv[1]), json.loads(sys.argv[2])))
"""


def test_kill_during_save_keeps_previous_checkpoint_and_resumes_exactly(resume_dataset, dual_full_run, tmp_path):
    preset, iterations = "dual_journal", CASES["dual_journal"][0]
    out = tmp_path / "killed"
    overrides = _overrides(resume_dataset, out, iterations)
    overrides["output_dir"], overrides["model_dir"] = str(out), str(out / "models")
    script = KILL_DURING_SAVE.format(root=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(_configs(preset)), json.dumps(overrides)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    files = sorted(os.listdir(out / "checkpoints"))
    assert files[0].startswith(".checkpoint_iteration=3.pt.partial-") and files[1:] == ["checkpoint_iteration=2.pt"]
    assert not (out / "models" / "model.pt").exists()
    checkpoint = out / "checkpoints" / "checkpoint_iteration=2.pt"
    assert torch.load(checkpoint, weights_only=True)["trainer"]["iteration"] == 2

    run_workflow(make_workflow(_configs(preset), {**overrides, "resume_from": str(checkpoint)}))
    _assert_identical(_final_state(out), _final_state(dual_full_run))
    assert sorted(os.listdir(out / "checkpoints")) == [
        "checkpoint_final.pt",
        "checkpoint_iteration=2.pt",  # the killed run's: a resumed run rotates only the files it wrote
        "checkpoint_iteration=5.pt",
    ]


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_resume_checkpoint_is_named(tmp_path, damage):
    network = torch.nn.Linear(2, 2)
    path = tmp_path / "checkpoint_iteration=8.pt"
    torch.save({"method": network.state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    for check in (lambda: check_resume_file(str(path)), lambda: ResumeLoader(str(path), {"method": network}).read()):
        with raises_bundle_error() as info:
            check()
        lines = str(info[0]).splitlines()
        assert lines[0] == "Cannot resume:"
        assert lines[1].startswith(f"  {path}: not a complete checkpoint, truncated or corrupt (")
    with raises_bundle_error("checkpoint lacks \\['optimizer'\\]"):
        torch.save({"method": network.state_dict()}, path)
        ResumeLoader(str(path), {"method": network, "optimizer": torch.optim.SGD(network.parameters(), 0.1)}).read()


def test_non_finite_loss_leaves_model_and_last_checkpoint_untouched(tiny_dataset, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    (out / "models").mkdir(parents=True)
    (out / "models" / "model.pt").write_bytes(b"previous good model")
    workflow = make_workflow(
        _configs("supervised_vnet"),
        tiny_overrides(tiny_dataset, out, max_iterations=4, **{"train#checkpoint_saver#save_interval": 2}),
    )
    workflow.initialize()
    method = workflow.parser.get_parsed_content("network")
    compute = method.compute_losses

    def nan_at_third(image, label, unlabeled, iteration, active=None):
        terms = compute(image, label, unlabeled, iteration, active)
        return {k: v * float("nan") for k, v in terms.items()} if iteration == 2 else terms

    method.compute_losses = nan_at_third
    with pytest.raises(RuntimeError) as info:  # MONAI wraps the trainer's error
        workflow.run()
    assert isinstance(info.value.__cause__, FloatingPointError)
    assert str(info.value.__cause__).startswith("iteration 3: non-finite sup (loss nan); training stopped")
    assert (out / "models" / "model.pt").read_bytes() == b"previous good model"
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint_iteration=2.pt"]
    saved = torch.load(out / "checkpoints" / "checkpoint_iteration=2.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == 2
    assert all(v.isfinite().all() for v in saved["method"].values() if v.is_floating_point())


def test_non_finite_weights_are_never_written(tmp_path):
    network = torch.nn.Linear(2, 2)
    path = tmp_path / "model.pt"
    path.write_bytes(b"previous")
    with torch.no_grad():
        network.bias[0] = float("inf")
    with pytest.raises(FloatingPointError, match="model.pt not written: non-finite values in bias"):
        SaveStateDictOnCompletion(network, str(path))(None)
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["model.pt"]
