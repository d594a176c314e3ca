"""The real ``configs/train.json`` (with each method preset) run through ``monai.bundle`` on tiny synthetic data."""

import os
import subprocess
import sys

import pytest
import torch
from monai.engines.utils import IterationEvents

from bundle.data.synthetic import ensure_synthetic_dataset
from tests.conftest import REPO_ROOT, raises_bundle_error
from tests.training_helpers import (
    at_first_iteration,
    flatten_state,
    make_workflow,
    run_workflow,
    same_value,
    tiny_overrides,
)

PRESETS = ["dual_journal", "dual_isbi", "supervised"]


def test_train_config_has_every_train_property(tiny_dataset, tmp_path):
    workflow = make_workflow(["train.json"], tiny_overrides(tiny_dataset, tmp_path))
    workflow.initialize()
    assert workflow.check_properties() in (None, [])


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_trains_and_writes_flat_model(preset, tiny_dataset, tmp_path):
    workflow = run_workflow(
        make_workflow(["train.json", f"methods/{preset}.json"], tiny_overrides(tiny_dataset, tmp_path))
    )
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 3
    output = trainer.state.output
    weights = workflow.parser["method#loss_weights"]
    expected_terms = {f"loss_{name}" for name, w in weights.items() if w}
    assert expected_terms <= set(output), f"missing terms {expected_terms - set(output)}"
    assert torch.isfinite(output["loss"])
    assert ("loss_cps" in output) == bool(weights["cps"])
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert state and all(k.startswith(("net_a.", "net_b.")) for k in state)
    assert (tmp_path / "checkpoints" / "checkpoint_final.pt").is_file()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    if preset == "supervised":
        assert trainer.unlabeled_data_loader is None


@pytest.mark.parametrize("preset", ["supervised", "dual_journal"])
def test_every_case_labeled_trains_supervised_only(preset, tmp_path):
    """All training cases labeled (the fully supervised upper bound): the supervised presets train without an
    unlabeled stream; a semi-supervised preset stops at the data check, naming the missing unlabeled data."""
    dataset = ensure_synthetic_dataset(str(tmp_path / "data"), num_labeled=4, num_unlabeled=0, num_validation=1,
                                       shape=(20, 20, 18))  # fmt: skip
    overrides = tiny_overrides(dataset, tmp_path / "out", num_labeled=-1)
    if preset == "supervised":
        workflow = run_workflow(make_workflow(["train.json", f"methods/{preset}.json"], overrides))
        trainer = workflow.parser.get_parsed_content("train#trainer")
        assert trainer.state.iteration == 3 and trainer.unlabeled_data_loader is None
    else:
        with raises_bundle_error("no unlabeled items"):
            run_workflow(make_workflow(["train.json", f"methods/{preset}.json"], overrides))


def test_weighted_sum_matches_logged_terms(tiny_dataset, tmp_path):
    workflow = run_workflow(make_workflow(["train.json"], tiny_overrides(tiny_dataset, tmp_path, max_iterations=1)))
    method = workflow.parser.get_parsed_content("network")
    output = workflow.parser.get_parsed_content("train#trainer").state.output
    weights = method.term_weights(0)
    expected = sum(weights[k[len("loss_") :]] * float(v) for k, v in output.items() if k.startswith("loss_"))
    assert float(output["loss"]) == pytest.approx(expected, rel=1e-5)


def test_zero_weight_switches_term_off(tiny_dataset, tmp_path):
    overrides = tiny_overrides(tiny_dataset, tmp_path, max_iterations=1)
    overrides["method#loss_weights#pgl"] = 0
    workflow = run_workflow(make_workflow(["train.json"], overrides))
    output = workflow.parser.get_parsed_content("train#trainer").state.output
    assert "loss_pgl" not in output and "loss_efs" in output


def test_resume_continues_at_saved_iteration_with_saved_optimizer(tiny_dataset, tmp_path):
    first = run_workflow(make_workflow(["train.json"], tiny_overrides(tiny_dataset, tmp_path / "a", max_iterations=2)))
    checkpoint = tmp_path / "a" / "checkpoints" / "checkpoint_final.pt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["trainer"]["iteration"] == 2
    momentum = [s["momentum_buffer"] for s in saved["optimizer"]["state"].values()]
    assert momentum and all(m.abs().sum() > 0 for m in momentum)

    overrides = tiny_overrides(tiny_dataset, tmp_path / "b", max_iterations=4, resume_from=str(checkpoint))
    second = make_workflow(["train.json"], overrides)
    second.initialize()
    trainer = second.parser.get_parsed_content("train#trainer")
    optimizer = second.parser.get_parsed_content("optimizer")
    params = optimizer.param_groups[0]["params"]
    seen = at_first_iteration(trainer, momentum=lambda: [optimizer.state[p]["momentum_buffer"].clone() for p in params])

    second.run()
    assert seen["iteration"] == 3  # ignite counts from 1: iterations 1-2 were done before the resume
    assert trainer.state.iteration == 4
    for restored, original in zip(seen["momentum"], momentum):
        torch.testing.assert_close(restored, original)
    del first


def test_bundle_cli_run_training(tiny_dataset, tmp_path):
    overrides = tiny_overrides(tiny_dataset, tmp_path, max_iterations=2)
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json"]
    for key, value in overrides.items():
        command += [f"--{key}", str(value).replace(" ", "")]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "iteration 2/2" in result.stdout + result.stderr
    assert (tmp_path / "models" / "model.pt").is_file()


def test_missing_dataset_dir_fails_before_training(tmp_path):
    workflow = make_workflow(["train.json"], tiny_overrides(str(tmp_path / "nope"), tmp_path))
    workflow.initialize()
    with raises_bundle_error() as info:  # the report, not a traceback through MONAI's config resolution
        workflow.run()
    assert str(info[0]).splitlines() == [
        "Data check failed:",
        f"  {tmp_path / 'nope'}: dataset_dir does not exist or is not a folder.",
    ]


@pytest.mark.parametrize("cache", [False, True])
def test_cpu_allocator_cache_is_opt_in(tiny_dataset, tmp_path, monkeypatch, cache):
    calls = []
    monkeypatch.setattr("bundle.engine.trainer.tune_cpu_allocator", lambda: calls.append(True))
    overrides = tiny_overrides(tiny_dataset, tmp_path, max_iterations=1, device="$torch.device('cpu')")
    if cache:
        overrides["train#trainer#cpu_allocator_cache"] = True
    workflow = make_workflow(["train.json"], overrides)
    workflow.initialize()
    workflow.parser.get_parsed_content("train#trainer")
    assert calls == ([True] if cache else [])


@pytest.mark.parametrize("preset", ["dual_journal", "mean_teacher"])
def test_gradients_freed_after_each_step_give_identical_weights(preset, tiny_dataset, tmp_path):
    """The trainer frees gradients before each forward (``optim_set_to_none``, default ``True``) instead of zeroing
    them in place: the same weights, BatchNorm statistics and optimizer state (EMA teacher too), and no gradient
    held during the forward."""
    states, held = {}, {}
    for free in (True, False):
        overrides = tiny_overrides(tiny_dataset, tmp_path / str(free), max_iterations=3)
        if not free:
            overrides["train#trainer#optim_set_to_none"] = False
        workflow = make_workflow(["train.json", f"methods/{preset}.json"], overrides)
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        assert trainer.optim_set_to_none is free
        trainer.add_event_handler(
            IterationEvents.FORWARD_COMPLETED,
            lambda engine: held.setdefault(free, []).append(
                sum(p.grad is not None for p in engine.method.trainable_parameters())
            ),
        )
        workflow.run()
        workflow.finalize()
        states[free] = torch.load(tmp_path / str(free) / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert held[True] == [0, 0, 0] and held[False][1] > 0
    for name in ("method", "optimizer"):
        flat_a, flat_b = flatten_state(states[True][name]), flatten_state(states[False][name])
        assert flat_a.keys() == flat_b.keys()
        assert [k for k in flat_a if not same_value(flat_a[k], flat_b[k])] == []


def test_console_shows_each_term_and_training_curves_are_written(tiny_dataset, tmp_path, capfd):
    run_workflow(make_workflow(["train.json"], tiny_overrides(tiny_dataset, tmp_path, max_iterations=2)))
    console = capfd.readouterr()
    line = next(text for text in (console.out + console.err).splitlines() if "iteration 2/2" in text)
    assert all(f"{name} " in line for name in ("sup", "cr", "cps", "efs", "ue", "pgl", "cos"))
    figure = tmp_path / "training_curves.png"
    assert figure.is_file() and figure.read_bytes()[:4] == b"\x89PNG" and figure.stat().st_size > 5000
