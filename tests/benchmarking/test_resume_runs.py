"""An interrupted benchmark training continues from its latest checkpoint (benchmarking/resume.py), wired into
``scripts/benchmark.py accuracy`` with the bundle's commands simulated (no training)."""

import json
import os

import pytest

import benchmarking.runs as runs
from benchmarking.resume import PARTS_FILE, finish_part, latest_checkpoint, read_parts, resumed_note, start_part
from bundle.config.errors import BundleError
from bundle.data.datalists import DatasetError

COMMAND = ["python", "-m", "monai.bundle", "run", "training", "--seed", "1"]


def touch(path, mtime=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_latest_checkpoint_is_the_highest_interval_not_the_final_or_a_partial_file(tmp_path):
    assert latest_checkpoint(str(tmp_path / "missing")) is None
    for name in ("checkpoint_iteration=250.pt", "checkpoint_iteration=1000.pt.tmp", "checkpoint_final.pt"):
        touch(str(tmp_path / name))
    touch(str(tmp_path / "checkpoint_iteration=750.pt"))
    assert latest_checkpoint(str(tmp_path)) == (750, str(tmp_path / "checkpoint_iteration=750.pt"))


def test_a_fresh_training_starts_at_zero_and_clears_an_earlier_trainings_checkpoints(tmp_path):
    run_dir = str(tmp_path / "run")
    stale = touch(os.path.join(run_dir, "checkpoints", "checkpoint_final.pt"))
    assert start_part(run_dir, COMMAND, "abc1234", "cpu A") is None
    assert not os.path.exists(stale)  # no interval checkpoint: a fresh start, nothing left to resume by mistake
    (part,) = read_parts(run_dir)
    assert (part["from_iteration"], part["commit"], part["hardware"], part["command"]) == (
        0,
        "abc1234",
        "cpu A",
        COMMAND,
    )
    timing = finish_part(run_dir, 42.5, 1000)
    assert timing == {"train_seconds": 42.5}  # not resumed: the record keeps its usual fields only
    assert resumed_note(timing) == ""


def test_a_rerun_resumes_and_times_the_interrupted_part_up_to_its_checkpoint(tmp_path):
    run_dir = str(tmp_path / "run")
    assert start_part(run_dir, COMMAND, "abc1234", "cpu A") is None
    started = read_parts(run_dir)[0]["start"]
    touch(os.path.join(run_dir, "checkpoints", "checkpoint_iteration=250.pt"), started + 60)
    newest = touch(os.path.join(run_dir, "checkpoints", "checkpoint_iteration=500.pt"), started + 100)
    assert start_part(run_dir, ["/other/venv/python"] + COMMAND[1:], "abc1234", "cpu B") == newest  # same command
    first, second = read_parts(run_dir)
    assert (first["to_iteration"], first["seconds"]) == (500, pytest.approx(100.0))  # work after 500 is redone
    assert second["from_iteration"] == 500
    timing = finish_part(run_dir, 30.0, 1000)
    assert timing["train_seconds"] == pytest.approx(130.0)
    assert timing["resumed_at"] == [500]
    assert [(p["from_iteration"], p["to_iteration"]) for p in timing["train_parts"]] == [(0, 500), (500, 1000)]
    note = resumed_note(timing)
    assert "resumed from its checkpoint at iteration 500" in note
    assert "different machines (cpu A; cpu B)" in note


def test_a_part_killed_before_its_first_checkpoint_counts_no_time(tmp_path):
    run_dir = str(tmp_path / "run")
    start_part(run_dir, COMMAND, "abc1234", "cpu A")
    started = read_parts(run_dir)[0]["start"]
    checkpoint = touch(os.path.join(run_dir, "checkpoints", "checkpoint_iteration=250.pt"), started + 50)
    assert start_part(run_dir, COMMAND, "abc1234", "cpu A") == checkpoint  # part 2 is killed at once
    assert start_part(run_dir, COMMAND, "abc1234", "cpu A") == checkpoint
    parts = read_parts(run_dir)
    assert [(p["from_iteration"], p["to_iteration"], p["seconds"]) for p in parts[:2]] == [
        (0, 250, pytest.approx(50.0)),
        (250, 250, 0.0),
    ]
    assert finish_part(run_dir, 20.0, 1000)["resumed_at"] == [250, 250]


def test_checkpoints_of_another_command_or_of_an_unrecorded_training_are_refused(tmp_path):
    run_dir = str(tmp_path / "run")
    start_part(run_dir, COMMAND, "abc1234", "cpu A")
    touch(os.path.join(run_dir, "checkpoints", "checkpoint_iteration=250.pt"))
    with pytest.raises(BundleError, match="run: its interrupted training ran another command .*--retrain"):
        start_part(run_dir, COMMAND + ["--num_labeled", "4"], "abc1234", "cpu A")
    os.remove(os.path.join(run_dir, PARTS_FILE))
    with pytest.raises(BundleError, match=f"whose parts were not recorded in {PARTS_FILE}.*--retrain"):
        start_part(run_dir, COMMAND, "abc1234", "cpu A")


def test_retrain_starts_over_and_removes_the_checkpoints_it_would_otherwise_resume(tmp_path):
    run_dir = str(tmp_path / "run")
    start_part(run_dir, COMMAND, "abc1234", "cpu A")
    checkpoint = touch(os.path.join(run_dir, "checkpoints", "checkpoint_iteration=250.pt"))
    assert start_part(run_dir, COMMAND + ["--seed", "2"], "def5678", "cpu A", retrain=True) is None
    assert not os.path.exists(checkpoint)
    assert [p["commit"] for p in read_parts(run_dir)] == ["def5678"]


def test_accuracy_resumes_an_interrupted_training_when_its_command_is_run_again(tmp_path, monkeypatch):
    """The first training is killed after its checkpoint at 250; the same accuracy call then trains from it and the
    record says so (train time over both parts, the parts, the note)."""
    dataset = tmp_path / "LA"
    dataset.mkdir()
    (dataset / "train.list").write_text("\n".join(f"case{i:02d}" for i in range(80)) + "\n")
    training_commands = []

    def fake_run_logged(command, log_path, cwd=None):
        if "training" not in command:
            return 1.0  # the evaluation
        training_commands.append(command)
        run_dir = os.path.dirname(log_path)
        if len(training_commands) == 1:
            start = read_parts(run_dir)[-1]["start"]
            touch(os.path.join(run_dir, "checkpoints", "checkpoint_iteration=250.pt"), start + 70)
            raise KeyboardInterrupt  # the session ends
        return 200.0

    metrics = {"per_case": [], "summary": {}, "num_cases": 20, "empty_predictions": 0}
    monkeypatch.setattr(runs, "run_logged", fake_run_logged)
    monkeypatch.setattr(runs, "read_metrics", lambda eval_dir: metrics)
    monkeypatch.setattr(runs, "resolved_hyperparameters", lambda parser: {"max_iterations": 1000})
    arguments = dict(method="supervised_vnet", runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "res"))
    arguments.update({"variant": "fp32", "train#trainer#precision": "fp32"})  # trains at full speed on any CPU
    with pytest.raises(KeyboardInterrupt):
        runs.accuracy(str(dataset), **arguments)
    path = runs.accuracy(str(dataset), **arguments)

    first, second = training_commands
    assert "--resume_from" not in first
    resume_from = second[second.index("--resume_from") + 1]
    assert resume_from.endswith(os.path.join("checkpoints", "checkpoint_iteration=250.pt"))
    assert [arg for arg in second if arg not in ("--resume_from", resume_from)] == first
    record = json.load(open(path))
    assert record["train_seconds"] == pytest.approx(270.0)
    assert [(p["from_iteration"], p["to_iteration"]) for p in record["train_parts"]] == [(0, 250), (250, 1000)]
    assert "resumed from its checkpoint at iteration 250" in record["notes"]
    assert "--resume_from" not in record["command"]  # the command that reruns the whole training


@pytest.mark.parametrize("native", [False, True])
def test_accuracy_refuses_emulated_bf16_before_writing_anything(tmp_path, monkeypatch, native):
    """The cpu protocol trains in bf16 autocast: on a CPU without native bf16 the run is refused with the fix."""
    import bundle.engine.precision as precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda *args: native)
    assert precision.emulated_bf16("bf16", "cpu") is not native
    assert not precision.emulated_bf16("fp32", "cpu") and not precision.emulated_bf16("bf16", "cuda")
    arguments = dict(method="supervised_vnet", protocol="cpu", runs_dir=str(tmp_path / "runs"))
    if native:  # the check passes; the missing dataset list stops the run next
        with pytest.raises(DatasetError, match="train.list: list file not found"):
            runs.accuracy(str(tmp_path / "LA"), **arguments)
    else:
        with pytest.raises(BundleError, match="emulates .* --variant fp32 --train#trainer#precision fp32"):
            runs.accuracy(str(tmp_path / "LA"), **arguments)
        assert not (tmp_path / "runs").exists()
    runs.check_training_precision(
        runs.parse_bundle(runs.method_configs("supervised_vnet", "cpu"), {"train#trainer#precision": "fp32"})
    )  # fp32 passes on any CPU
