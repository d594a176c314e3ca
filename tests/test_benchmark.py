"""Benchmark driver pieces that need no training: the split, the bundle command line and the generated report."""

import json
import shlex

import numpy as np
import pytest

from bundle.benchmark import accuracy, bundle_command, mean_std, report, split_lists, write_json


def test_split_lists_trains_on_the_first_cases_and_tests_on_the_rest(tmp_path):
    cases = [f"case{i:02d}" for i in range(10)]
    (tmp_path / "train.list").write_text("\n".join(cases) + "\n")
    paths = split_lists(str(tmp_path), "train.list", 7, str(tmp_path / "run"))
    assert open(paths["train"]).read().split() == cases[:7]
    assert open(paths["test"]).read().split() == cases[7:]
    with pytest.raises(ValueError, match="10 cases, need more than train_cases=10"):
        split_lists(str(tmp_path), "train.list", 10, str(tmp_path / "run"))


def test_bundle_command_passes_every_override_as_monai_bundle_reads_it():
    overrides = {"num_labeled": 8, "patch_size": [64, 64, 32], "val_list": None, "dataset_dir": "/d"}
    command = bundle_command("training", ["configs/train.json", "configs/methods/cps.json"], overrides)
    assert command[1:5] == ["-m", "monai.bundle", "run", "training"]
    assert json.loads(command[6]) == ["configs/train.json", "configs/methods/cps.json"]
    flags = dict(zip(command[7::2], command[8::2]))
    assert flags == {"--num_labeled": "8", "--patch_size": "[64,64,32]", "--val_list": "None", "--dataset_dir": "/d"}
    assert shlex.split(shlex.join(command)) == command


def test_mean_std_is_the_population_statistic():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": 1.0}


def test_read_metrics_flattens_the_evaluation_summary(tmp_path):
    from bundle.benchmark import read_metrics
    from bundle.evaluation import MetricsReport

    report_ = MetricsReport(str(tmp_path), num_slices=0)
    for case, shift in (("a", 0), ("b", 1)):
        label = np.zeros((10, 10, 10), np.uint8)
        label[2:7, 2:7, 2:7] = 1
        report_.add(case, np.roll(label, shift, axis=0), label)
    report_.write()
    result = read_metrics(str(tmp_path))
    assert [row["case"] for row in result["per_case"]] == ["a", "b"]
    dice_b = 2 * 100 / 250
    assert result["summary"]["dice"]["mean"] == pytest.approx((1.0 + dice_b) / 2)
    assert result["summary"]["dice"]["std"] == pytest.approx((1.0 - dice_b) / 2)
    assert result["num_cases"] == 2 and result["empty_predictions"] == []


def _accuracy_record(method, dice):
    return {
        "kind": "accuracy",
        "method": method,
        "protocol": "cpu",
        "num_labeled": 8,
        "command": f"python -m monai.bundle run training {method}",
        "commit": "abc1234",
        "hardware": "test cpu",
        "seed": 1337,
        "train_seconds": 1800.0,
        "summary": {
            "dice": {"mean": dice, "std": 0.05},
            "jaccard": {"mean": dice - 0.1, "std": 0.04},
            "hd95": {"mean": 7.25, "std": 2.0},
            "asd": {"mean": 1.5, "std": 0.5},
        },
    }


def test_report_renders_every_record_with_paper_numbers_and_ratios(tmp_path):
    results = tmp_path / "results"
    write_json(_accuracy_record("dual_journal", 0.8512), str(results), "la_cpu_dual_journal_k8_seed1337")
    write_json(_accuracy_record("supervised", 0.7), str(results), "la_cpu_supervised_k8_seed1337")
    ablation = {**_accuracy_record("dual_journal", 0.83), "variant": "no_pgl", "overrides": {"loss_weights#pgl": 0}}
    write_json(ablation, str(results), "la_cpu_dual_journal_no_pgl_k8_seed1337")
    speed = {"kind": "speed", "device": "cpu", "command": "speed cmd", "commit": "abc1234", "hardware": "test cpu",
             "rows": [{"probe": "train_64x64x32", "variant": "activation checkpointing", "seconds_per_iteration": 4.4,
                       "peak_rss_gib": 2.0}]}  # fmt: skip
    write_json(speed, str(results), "speed_cpu_dual_journal")
    memory = {"kind": "memory", "device": "cpu", "volume": [512, 512, 300], "patch": [128, 128, 96],
              "strides": [128, 128, 96], "peak_rss_gib": 3.5, "seconds": 200.0, "command": "memory cmd",
              "commit": "abc1234", "hardware": "test cpu"}  # fmt: skip
    write_json(memory, str(results), "memory_cpu_512x512x300")
    text = open(report(str(results), str(tmp_path / "RESULTS.md"))).read()
    dual_row = next(line for line in text.splitlines() if line.startswith("| dual_journal | 8 |"))
    cells = [cell.strip() for cell in dual_row.split("|")[1:-1]]
    assert cells[2:10] == ["85.12 ± 5.00", "75.12 ± 4.00", "7.25 ± 2.00", "1.50 ± 0.50",
                           "89.95", "81.81", "5.73", "1.79"]  # fmt: skip
    assert cells[10] == "30 min"
    assert "| supervised | 8 | 70.00 ± 5.00 |" in text
    ablation_row = next(line for line in text.splitlines() if line.startswith("| dual_journal [no_pgl] | 8 |"))
    assert [cell.strip() for cell in ablation_row.split("|")[3:11]] == ["83.00 ± 5.00", "73.00 ± 4.00", "7.25 ± 2.00",
                                                                        "1.50 ± 0.50", "–", "–", "–", "–"]  # fmt: skip
    speed_row = next(line for line in text.splitlines() if "train_64x64x32" in line)
    assert [cell.strip() for cell in speed_row.split("|")[4:-1]] == [
        "activation checkpointing", "4.40", "2.00", "8.8", "0.50", "2.4", "0.83"]  # fmt: skip
    assert "| 512×512×300 | 128×128×96 / 128×128×96 | 3.50 | 200 |" in text
    assert text.count("commit abc1234") == 5


def test_accuracy_overrides_need_a_variant_name(tmp_path):
    with pytest.raises(ValueError, match="--variant"):
        accuracy(str(tmp_path), method="dual_journal", **{"loss_weights#pgl": 0})
    assert list(tmp_path.iterdir()) == []  # refused before any split or run folder is written
