"""``benchmarking/gpu_check.py`` on the CPU: every probe of the GPU check runs with tiny sizes and is recorded."""

import json

import pytest
import torch

from benchmarking.gpu_check import gpu_check, la_test_cases
from tests.peer_helpers import poisoned_la_dataset


def test_la_test_cases_are_the_cases_after_the_training_cases(tmp_path):
    (tmp_path / "train.list").write_text("\n".join(f"c{i}" for i in range(80)) + "\n")
    assert la_test_cases(str(tmp_path)) == [f"c{i}" for i in range(60, 80)]
    assert la_test_cases(str(tmp_path), count=3) == ["c60", "c61", "c62"]
    (tmp_path / "train.list").write_text("a\nb\nc\nd\n")  # a small dataset: its second half
    assert la_test_cases(str(tmp_path)) == ["c", "d"]


def test_refuses_without_cuda_unless_allowed(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        gpu_check(dataset_dir=str(tmp_path), results_dir=str(tmp_path))


def test_every_probe_runs_and_is_recorded(tmp_path):
    dataset = poisoned_la_dataset(tmp_path / "la", poison=None, num_cases=4)
    path = gpu_check(
        dataset_dir=str(dataset),
        iterations=1,
        patch=(32, 32, 32),
        strides=(16, 16, 16),
        torchrun_iterations=1,
        results_dir=str(tmp_path / "results"),
        allow_cpu=True,
        overrides={"base_width": 4},
    )
    record = json.loads(open(path).read())
    assert record["kind"] == "gpu_check" and record["device"] == "cpu" and record["overrides"] == {"base_width": 4}
    assert record["train"]["iterations_timed"] == 1 and record["train"]["seconds_per_iteration"] > 0
    assert [row["case"] for row in record["inference"]["cases"]] == ["case2", "case3"]
    assert all(row["shape"] == [20, 20, 18] and row["seconds"] > 0 for row in record["inference"]["cases"])
    assert record["authors"] == {
        "timed": False,
        "reason": "no authors_bench command given (their code's mirrors were not available)",
    }
    smoke = record["torchrun"]
    assert (smoke["backend"], smoke["returncode"], smoke["model_written"]) == ("gloo", 0, True), smoke["output_tail"]
