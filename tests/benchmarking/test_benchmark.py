"""Benchmark driver pieces that need no training: the split, the bundle command line and the generated report."""

import json
import runpy
import shlex

import numpy as np
import pytest
import torch

from benchmarking.report import reference_variant
from benchmarking.results_page import report
from benchmarking.runs import (
    AUTHORS_REFERENCE,
    SPEED_FLAGS,
    accuracy,
    bundle_command,
    cpu_description,
    cpu_kind,
    reference_machine,
    run_isolated,
    same_run_reference,
    speed_reference,
    split_lists,
    write_json,
)
from tests.conftest import REPO_ROOT


def test_split_lists_trains_on_the_first_cases_and_tests_on_the_rest(tmp_path):
    cases = [f"case{i:02d}" for i in range(10)]
    (tmp_path / "train.list").write_text("\n".join(cases) + "\n")
    paths = split_lists(str(tmp_path), "train.list", 7, str(tmp_path / "run"))
    assert open(paths["train"]).read().split() == cases[:7]
    assert open(paths["test"]).read().split() == cases[7:]
    with pytest.raises(ValueError, match="10 cases, need more than train_cases=10"):
        split_lists(str(tmp_path), "train.list", 10, str(tmp_path / "run"))


def test_bundle_command_passes_every_override_as_monai_bundle_reads_it():
    overrides = {"num_labeled": 8, "patch_size": [64, 64, 32], "datalists#val_list": None, "dataset_dir": "/d"}
    command = bundle_command("training", ["configs/train.json", "configs/methods/cps.json"], overrides)
    assert command[1:5] == ["-m", "monai.bundle", "run", "training"]
    assert json.loads(command[6]) == ["configs/train.json", "configs/methods/cps.json"]
    flags = dict(zip(command[7::2], command[8::2]))
    flag_values = {
        "--num_labeled": "8",
        "--patch_size": "[64,64,32]",
        "--datalists#val_list": "None",
        "--dataset_dir": "/d",
    }
    assert flags == flag_values
    assert shlex.split(shlex.join(command)) == command


def test_read_metrics_flattens_the_evaluation_summary(tmp_path):
    from benchmarking.runs import read_metrics
    from bundle.inference.evaluation import MetricsReport

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


def _accuracy_record(method, dice, seed=1337, variant=""):
    """A record whose 20 test cases score ``dice + (i - 9.5) / 1000``: case means equal ``dice``."""
    per_case = [{"case": f"c{i:02d}", "dice": dice + (i - 9.5) / 1000} for i in range(20)]
    return {
        "kind": "accuracy",
        "method": method,
        "variant": variant,
        "protocol": "cpu",
        "num_labeled": 8,
        "command": f"python -m monai.bundle run training {method}",
        "commit": "abc1234",
        "hardware": "test cpu",
        "seed": seed,
        "train_seconds": 1800.0,
        "per_case": per_case,
        "summary": {
            "dice": {"mean": dice, "std": 0.05},
            "jaccard": {"mean": dice - 0.1, "std": 0.04},
            "hd95": {"mean": 7.25, "std": 2.0},
            "asd": {"mean": 1.5, "std": 0.5},
        },
    }


def _row(text, label):
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.split("|")[1:-1]]


def test_report_summarises_seeds_and_compares_each_row_with_its_reference(tmp_path):
    results = tmp_path / "results"
    for seed, (dual, sup, vnet, mt) in {1: (0.85, 0.80, 0.70, 0.69), 2: (0.87, 0.82, 0.72, 0.71)}.items():
        write_json(_accuracy_record("dual_journal", dual, seed), str(results), f"la_cpu_dual_journal_k8_seed{seed}")
        write_json(_accuracy_record("supervised", sup, seed), str(results), f"la_cpu_supervised_k8_seed{seed}")
        write_json(
            _accuracy_record("supervised_vnet", vnet, seed), str(results), f"la_cpu_supervised_vnet_k8_seed{seed}"
        )
        write_json(_accuracy_record("mean_teacher", mt, seed), str(results), f"la_cpu_mean_teacher_k8_seed{seed}")
    ablation = _accuracy_record("dual_journal", 0.80, 1, variant="no_pgl")
    write_json(ablation, str(results), "la_cpu_dual_journal_no_pgl_k8_seed1")
    speed = {"kind": "speed", "device": "cpu", "command": "speed cmd", "commit": "abc1234", "hardware": "AMD EPYC, x",
             "rows": [{"probe": "train_64x64x32", "variant": "activation checkpointing", "seconds_per_iteration": 4.4,
                       "peak_rss_gib": 2.0}]}  # fmt: skip
    write_json(speed, str(results), "speed_cpu_a_dual_journal")  # from before the CPU fields: no figure to compare
    avx2 = {**speed, "cpu": {"model": "AMD EPYC", "vendor": "AMD", "flags": ["avx2"]},
            "rows": [{**speed["rows"][0], "defaults": True}]}  # fmt: skip
    write_json(avx2, str(results), "speed_cpu_b_amd_avx2_dual_journal")
    avx512 = {**speed, "cpu": {"model": "AMD EPYC 9B14", "flags": ["avx2", "avx512f", "avx512_bf16"]},
              "rows": [{**speed["rows"][0], "precision": "bf16", "seconds_per_iteration": 1.465}]}  # fmt: skip
    write_json(avx512, str(results), "speed_cpu_c_amd_avx512_dual_journal")
    same_run = {**avx512, "reference": {"measured": "today", "seconds": {"train_64x64x32": 2.0},
                                        "peak_gib": {"train_64x64x32": 4.0}, "cpu_model": "AMD EPYC"}}  # fmt: skip
    write_json(same_run, str(results), "speed_cpu_d_amd_avx512_same_run_dual_journal")
    xeon = {**speed, "hardware": "Xeon", "cpu": {"model": "Intel(R) Xeon(R)", "flags": ["avx512_bf16", "amx_bf16"]},
            "rows": [{**speed["rows"][0], "precision": "bf16", "seconds_per_iteration": 1.15}]}  # fmt: skip
    write_json(xeon, str(results), "speed_cpu_e_xeon_dual_journal")
    other = {**xeon, "hardware": "Other", "cpu": {"model": "Intel(R) Xeon(R)", "flags": ["avx2", "avx512f"]},
             "reference_note": "no figure for Other"}  # fmt: skip
    write_json(other, str(results), "speed_cpu_f_other_dual_journal")
    memory = {"kind": "memory", "device": "cpu", "volume": [512, 512, 300], "patch": [128, 128, 96],
              "strides": [128, 128, 96], "peak_rss_gib": 3.5, "seconds": 200.0, "command": "memory cmd",
              "commit": "abc1234", "hardware": "test cpu"}  # fmt: skip
    write_json(memory, str(results), "memory_cpu_512x512x300")
    output = tmp_path / "docs" / "RESULTS.md"
    text = open(report(str(results), str(output), str(tmp_path / "docs" / "figures"))).read()
    # mean ± sample sd over the two seeds; the paired difference is exactly +5 points on every case and seed
    assert _row(text, "dual_journal") == ["dual_journal", "1, 2", "86.00 ± 1.41", "0/40 (0, 0)", "76.00 ± 1.41",
                                          "7.25 ± 0.00", "1.50 ± 0.00", "supervised", "+5.00 [+5.00, +5.00]", "20/20",
                                          "above", "+5.00 [+5.00, +5.00] (40/40)", "30 min", "89.95"]  # fmt: skip
    assert _row(text, "mean_teacher")[7:11] == ["supervised_vnet", "-1.00 [-1.00, -1.00]", "0/20", "below"]
    assert _row(text, "supervised")[7:12] == ["–", "–", "–", "–", "–"]
    assert _row(text, "supervised_vnet")[13] == "51.76"  # the paper's V-Net row sits on the V-Net reference
    # the ablation has one seed (no sd): paired with the reference's default runs on the common seed 1 only
    assert _row(text, "dual_journal [no_pgl]")[2:4] == ["80.00", "0/20"]
    assert _row(text, "dual_journal [no_pgl]")[7:14] == ["supervised", "+0.00 [+0.00, +0.00]", "0/20",
                                                         "not separable", "+0.00 [+0.00, +0.00] (20/20)", "30 min",
                                                         "–"]  # fmt: skip
    assert "![Dice per method and paired differences](figures/la_cpu_k8.png)" in text
    assert (tmp_path / "docs" / "figures" / "la_cpu_k8.png").stat().st_size > 10000
    speed_rows = [[cell.strip() for cell in line.split("|")[2:-1]] for line in text.splitlines() if "train_64" in line
                  and line.startswith("| `speed")]  # fmt: skip
    assert speed_rows == [
        ["cpu: CPU flags not recorded: no figure", "train_64x64x32", "activation checkpointing", "fp32", "4.40",
         "2.00", "–", "–", "–", "–"],
        ["cpu: AMD, AVX2, no AVX-512", "train_64x64x32", "activation checkpointing (train.json's settings)", "fp32",
         "4.40", "2.00", "8.8", "0.50", "2.4", "0.83"],
        ["cpu: AMD, AVX-512 BF16", "train_64x64x32", "activation checkpointing", "bf16", "1.47", "2.00", "2.93",
         "0.50", "2.4", "0.83"],
        ["cpu: AMD, AVX-512 BF16, timed in this run", "train_64x64x32", "activation checkpointing", "bf16", "1.47",
         "2.00", "2.0", "0.73", "4.0", "0.50"],
        ["cpu: Intel, AVX-512 BF16 + AMX", "train_64x64x32", "activation checkpointing", "bf16", "1.15", "2.00",
         "4.6", "0.25", "2.5", "0.80"],
        ["cpu: Intel, AVX-512, no BF16: no figure", "train_64x64x32", "activation checkpointing", "bf16", "1.15",
         "2.00", "–", "–", "–", "–"],
    ]  # fmt: skip
    assert "(no figure for Other)" in text
    assert "| 512×512×300 | 128×128×96 / 128×128×96 | 3.50 | 200 |" in text
    assert text.count("commit abc1234") == 16


def test_report_gives_the_share_of_the_gap_to_the_fully_labeled_run(tmp_path):
    results = tmp_path / "results"
    for seed, (dual, sup) in {1: (0.85, 0.80), 2: (0.87, 0.82)}.items():
        write_json(_accuracy_record("dual_journal", dual, seed), str(results), f"la_cpu_dual_journal_k8_seed{seed}")
        write_json(_accuracy_record("supervised", sup, seed), str(results), f"la_cpu_supervised_k8_seed{seed}")
    bound = {**_accuracy_record("supervised", 0.91), "num_labeled": 60}
    bound["split"] = "train: first 60 of train.list (60 labeled); test: the remaining cases"
    write_json(bound, str(results), "la_cpu_supervised_k60_seed1337")
    partly = {**_accuracy_record("supervised", 0.95), "num_labeled": 30}  # not fully labeled: never the bound
    partly["split"] = "train: first 60 of train.list (30 labeled); test: the remaining cases"
    write_json(partly, str(results), "la_cpu_supervised_k30_seed1337")
    targets = [
        {"protocol": "cpu", "k": 8, "methods": ["dual_journal"], "min_delta": 3.0, "interval_above_zero": True,
         "source": "issue A"},
        {"protocol": "cpu", "k": 8, "methods": ["dual_journal", "mean_teacher"], "min_delta": 6.0,
         "interval_above_zero": False, "source": "issue B", "why": "see the probes."},
        {"protocol": "cpu", "k": 4, "methods": ["dual_journal"], "min_delta": 0.0, "interval_above_zero": False,
         "source": "issue C"},
    ]  # fmt: skip
    write_json({"kind": "targets", "targets": targets}, str(results), "targets")
    text = open(report(str(results), str(tmp_path / "RESULTS.md"), None)).read()
    assert ("- Target (issue A): `dual_journal` at least +3.00 Dice above its reference with the interval above 0: "
            "**met** (+5.00 [+5.00, +5.00] vs `supervised`).") in text  # fmt: skip
    assert ("- Target (issue B): `dual_journal` at least +6.00 Dice above its reference: **missed** (+5.00 [+5.00, "
            "+5.00] vs `supervised`). Why: see the probes.") in text  # fmt: skip
    assert "**met** (+5.00 [+5.00, +5.00] vs `supervised`). Why" not in text  # only a miss is explained
    assert "- Target (issue B): `mean_teacher` at least +6.00 Dice above its reference: **not measured**." in text
    assert "issue C" not in text  # no K = 4 runs: no K = 4 section
    # reference at K = 8: 81.00; bound 91.00; dual_journal +5.00 -> 50 % of the 10-point gap
    assert "Upper bound: `supervised` with all 60 training cases labeled reaches 91.00 Dice" in text
    assert "(seeds 1337), +10.00 over `supervised` at K = 8;" in text
    assert "(Δ Dice / gap): dual_journal 50 %." in text
    assert text.count("Upper bound:") == 1  # K = 30 and K = 60 have no compared rows


def test_accuracy_overrides_need_a_variant_name(tmp_path):
    with pytest.raises(ValueError, match="--variant"):
        accuracy(str(tmp_path), method="dual_journal", **{"method#loss_weights#pgl": 0})
    assert list(tmp_path.iterdir()) == []  # refused before any split or run folder is written


#: ``/proc/cpuinfo`` flag lines of the machine kinds met so far (an AVX2-only AMD EPYC VM as this project's, an
#: AMD EPYC with AVX-512 BF16, a Xeon with AMX, a Xeon with AVX-512 but no BF16), shortened but in their real form.
AVX2_EPYC = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
    "syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl pni pclmulqdq ssse3 fma cx16 "
    "sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand hypervisor bmi1 avx2 smep bmi2 sha_ni vaes rdpid"
)
BF16_EPYC = AVX2_EPYC + " avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vnni"
AMX_XEON = (
    "fpu vme de pse tsc sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512cd avx512bw "
    "avx512vl avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8"
)
AVX512_XEON = "fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512cd avx512bw avx512vl"


def _cpuinfo(tmp_path, name, vendor, model, flags):
    path = tmp_path / name
    path.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 25\nmodel name\t: {model}\n"
                    f"flags\t\t: {flags}\nbogomips\t: 4890.85\n\nprocessor\t: 1\nvendor_id\t: {vendor}\n")  # fmt: skip
    return str(path)


def test_the_authors_figures_are_keyed_by_what_the_cpu_offers_not_its_model_name(tmp_path):
    machines = {
        "avx2_epyc": ("AuthenticAMD", "AMD EPYC", AVX2_EPYC, "AMD", "AMD, AVX2, no AVX-512", False),
        "bf16_epyc": ("AuthenticAMD", "AMD EPYC", BF16_EPYC, "AMD", "AMD, AVX-512 BF16", True),
        "amx_xeon": ("GenuineIntel", "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", AMX_XEON, "Intel",
                     "Intel, AVX-512 BF16 + AMX", True),
        "avx512_xeon": ("GenuineIntel", "Intel(R) Xeon(R) CPU @ 2.20GHz", AVX512_XEON, "Intel",
                        "Intel, AVX-512, no BF16", False),
    }  # fmt: skip
    for name, (vendor_id, model, flags, vendor, kind, native_bf16) in machines.items():
        description = cpu_description(_cpuinfo(tmp_path, name, vendor_id, model, flags))
        assert description["kind"] == kind and description["vendor"] == vendor and description["model"] == model
        assert description["native_bf16"] is native_bf16
        assert set(description["flags"]) == {f for f in SPEED_FLAGS if f in flags.split()}
        assert cpu_kind(vendor_id, flags.split()) == cpu_kind(model, flags.split()) == kind
    # same model name, different rows: the AVX2-only EPYC gets 8.8 s at 64x64x32, the AVX-512 BF16 one 2.93 s
    assert AUTHORS_REFERENCE[reference_machine("AMD EPYC", AVX2_EPYC.split())]["seconds"]["train_64x64x32"] == 8.8
    assert AUTHORS_REFERENCE[reference_machine("AMD EPYC", BF16_EPYC.split())]["seconds"]["train_64x64x32"] == 2.93
    assert reference_machine("Intel(R) Xeon(R) Platinum 8481C", AMX_XEON.split()) == "Intel, AVX-512 BF16 + AMX"
    assert reference_machine("GenuineIntel", AVX512_XEON.split()) is None  # not timed on that kind
    assert reference_machine("Apple M2", ["fp", "asimd", "bf16"]) is None
    assert cpu_kind("Apple M2", ["fp", "asimd", "bf16"]) == "Apple M2, no AVX2"
    # a stored record with its CPU flags keeps its row; one made before flags were recorded gets no figure
    with open("docs/results/speed_cpu_amd_epyc_dual_journal_17c3f82.json") as handle:
        assert speed_reference(json.load(handle))[0].startswith("AMD, AVX-512 BF16")
    with open("docs/results/speed_cpu_dual_journal.json") as handle:
        assert speed_reference(json.load(handle))[0] == "CPU flags not recorded: no figure"
    description = cpu_description()  # this machine
    assert set(description) == {"model", "vendor", "flags", "native_bf16", "kind"}
    assert set(description["flags"]) <= set(SPEED_FLAGS)


def test_same_run_reference_reads_the_reference_bench_output(tmp_path):
    bench = {"date_utc": "2026-12-02T11:00:00Z", "cpu_model": "AMD EPYC 9R14", "threads": 2,
             "loadavg_before": [0.1, 0.1, 0.1], "loadavg_after": [2.0, 1.5, 1.0],
             "sources": {"a/b": {"git_dir": "/abs/path", "commit": "c0ffee"}},
             "train": {"64x64x32": {"median_s": 8.5, "peak_rss_mb": 2457.6}},
             "inference": {"seconds": 120.5, "peak_rss_mb": 3276.8}}  # fmt: skip
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(bench))
    reference = same_run_reference(str(path))
    assert reference["seconds"] == {"train_64x64x32": 8.5, "infer_175x132x88": 120.5}
    assert reference["peak_gib"] == {"train_64x64x32": 2.4, "infer_175x132x88": 3.2}
    assert reference["source_commits"] == {"a/b": "c0ffee"} and "/abs/path" not in json.dumps(reference)
    bench["inference"] = {"error": "timed out after 10 s"}
    path.write_text(json.dumps(bench))
    with pytest.raises(ValueError, match="did not run for \\['inference'\\]"):
        same_run_reference(str(path))


def test_speed_probes_run_on_a_tiny_network():
    """The probes of ``scripts/benchmark.py speed``, each in its own process, on a tiny configuration (no timing is
    asserted: only that they run with train.json's keys and report what the record needs)."""
    configs = ["configs/train.json", "configs/methods/dual_journal.json"]
    tiny = {"patch_size": [16, 16, 16], "base_width": 4, "validate#precision": "fp32"}
    result = run_isolated("time_inference", config_files=configs, overrides=tiny, volume_shape=[20, 18, 16],
                          strides=[8, 8, 8])  # fmt: skip
    assert result["output_shape"] == [1, 2, 20, 18, 16] and result["precision"] == "fp32"
    assert result["seconds_per_volume"] > 0 and result["peak_rss_gib"] > 0
    with pytest.raises(RuntimeError, match="time_inference probe failed (?s:.*)strides \\[8\\] differ in length"):
        run_isolated("time_inference", config_files=configs, overrides=tiny, volume_shape=[20, 18, 16], strides=[8])


def test_a_validation_split_stays_within_the_first_60_cases(tmp_path):
    cases = [f"case{i:02d}" for i in range(80)]
    (tmp_path / "train.list").write_text("\n".join(cases) + "\n")
    paths = split_lists(str(tmp_path), "train.list", 48, str(tmp_path / "val"), test_cases=12)
    assert open(paths["train"]).read().split() == cases[:48]
    assert open(paths["test"]).read().split() == cases[48:60]  # never one of the benchmark's test cases 60..79
    for train_cases, test_cases in ((48, 13), (60, 1), (48, 0)):
        with pytest.raises(ValueError, match="must hold at least one case and stay within the first 60"):
            split_lists(str(tmp_path), "train.list", train_cases, str(tmp_path / "bad"), test_cases=test_cases)


def test_ablation_overrides_win_over_the_protocols_method_arguments():
    from benchmarking.runs import method_configs, run_settings

    configs = method_configs("dual_journal", "cpu")
    assert run_settings(configs, "d", "r", 8, 1, {})["method#rampup_iters"] == 250  # the protocol's ramp
    assert run_settings(configs, "d", "r", 8, 1, {"method#rampup_iters": 0})["method#rampup_iters"] == 0


def test_report_compares_validation_variants_with_the_default_in_their_own_section(tmp_path):
    results = tmp_path / "results"
    for variant, dice in (("", 0.80), ("unramped", 0.78)):
        record = _accuracy_record("dual_journal", dice, 1, variant)
        record.update(evaluation="validation", split="train: first 48 (8 labeled); validation: the next 12",
                      overrides={"method#rampup_iters": 0} if variant else {})  # fmt: skip
        record["per_case"] = record["per_case"][:12]
        write_json(record, str(results / "validation"), f"la_cpu_val48_dual_journal_{variant}_k8_seed1")
    write_json(_accuracy_record("supervised", 0.70, 1), str(results), "la_cpu_supervised_k8_seed1")
    text = open(report(str(results), str(tmp_path / "RESULTS.md"), None)).read()
    section = text[text.index("## Choosing settings on a validation split") :]
    assert "### dual_journal, K = 8, `cpu` protocol (train: first 48 (8 labeled); validation: the next 12)" in section
    assert _row(section, "unramped")[1:] == ["`method#rampup_iters 0`", "1", "78.00", "0/12", "-2.00 [-2.00, -2.00]",
                                             "0/12", "below", "-2.00 [-2.00, -2.00] (12/12)"]  # fmt: skip
    assert _row(section, "default")[4:] == ["0/12", "–", "–", "–", "–"]
    assert "dual_journal [unramped]" not in text[: text.index("## Choosing")]  # never mixed into the test tables


def test_a_validation_variant_is_compared_with_the_variant_its_name_extends(tmp_path):
    """``fp32_torch_init`` is paired with ``fp32`` (no default run here); a variant with no base and no default has
    no comparison."""
    results = tmp_path / "results"
    for variant, dice, overrides in (("fp32", 0.75, {"precision": "fp32"}),
                                     ("fp32_torch_init", 0.80, {"precision": "fp32", "weight_init": "torch_default"}),
                                     ("bf16", 0.70, {"precision": "bf16"})):  # fmt: skip
        record = _accuracy_record("supervised_vnet", dice, 1, variant)
        record.update(evaluation="validation", split="train: first 48 (8 labeled); validation: the next 12",
                      overrides=overrides)  # fmt: skip
        record["per_case"] = record["per_case"][:12]
        write_json(record, str(results / "validation"), f"la_cpu_val48_supervised_vnet_{variant}_k8_seed1")
    text = open(report(str(results), str(tmp_path / "RESULTS.md"), None)).read()
    section = text[text.index("## Choosing settings on a validation split") :]
    assert _row(section, "fp32_torch_init (vs fp32)")[4:7] == ["0/12", "+5.00 [+5.00, +5.00]", "12/12"]
    assert _row(section, "bf16")[4:7] == ["0/12", "–", "–"]
    assert _row(section, "fp32")[4:7] == ["0/12", "–", "–"]
    assert reference_variant("fp32_torch_init", ["", "fp32", "fp32_torch"]) == "fp32_torch"
    assert reference_variant("unramped", ["", "unramped"]) == ""
    assert reference_variant("", ["", "fp32"]) is None


def test_term_probe_alignment_is_exact_over_a_v_net_sized_gradient():
    """A gradient's cosine with itself is 1 and its relative norm 1 over 10^7 weights (summed in fp32 the cosine came
    out 1.0007 here and 1.003 in a probe record); orthogonal and opposite gradients give 0 and -1, norms scale."""
    probe_terms = runpy.run_path(str(REPO_ROOT / "scripts" / "probe_terms.py"))
    g = torch.randn(10_000_000, generator=torch.Generator().manual_seed(0)) * 1e-3
    norm, cosine = probe_terms["alignment"](g, g)
    assert cosine == pytest.approx(1.0, abs=1e-9) and norm == pytest.approx(1.0, abs=1e-9)
    norm, cosine = probe_terms["alignment"](-3 * g, g)
    assert cosine == pytest.approx(-1.0, abs=1e-9) and norm == pytest.approx(3.0, rel=1e-9)
    a, b = torch.zeros(4), torch.zeros(4)
    a[0], b[1] = 2.0, 1.0
    assert probe_terms["alignment"](a, b) == (2.0, 0.0)
    weight = torch.nn.Parameter(torch.ones(3))
    unused = torch.nn.Parameter(torch.ones(2))
    flat = probe_terms["gradient"]((weight * torch.tensor([1.0, 2.0, 3.0])).sum(), [weight, unused])
    assert flat.dtype == torch.float64 and flat.tolist() == [1.0, 2.0, 3.0, 0.0, 0.0]


def test_report_tabulates_term_probes(tmp_path):
    probe = {"kind": "term_probe", "method": "mean_teacher", "num_labeled": 8, "iteration": 1000,
             "terms": {"sup": {"weight": 1.0, "value": 0.08, "norm": 1.0, "cosine": 1.0},
                       "cons": {"weight": 0.1, "value": 0.015, "norm": 0.066, "cosine": 0.136}},
             "unlabeled_pseudo_labels": {"fg_truth": 0.2, "dice_student": 0.704, "dice_teacher": 0.783},
             "command": "python scripts/probe_terms.py", "commit": "abc1234", "hardware": "test cpu"}  # fmt: skip
    write_json(probe, str(tmp_path / "results"), "term_probe_mean_teacher")
    text = open(report(str(tmp_path / "results"), str(tmp_path / "RESULTS.md"), None)).read()
    assert _row(text, "cons") == ["cons", "0.1", "0.0150", "0.066", "0.136"]
    assert "Pseudo-label Dice on the unlabeled crops: student 0.704, teacher 0.783 (foreground truth 0.200" in text


def test_a_speed_record_carries_the_authors_row_of_its_kind_of_cpu(tmp_path, monkeypatch):
    """``speed`` with its probes faked (no timing): the record names the kind of CPU read from a hand-made
    ``/proc/cpuinfo`` and the authors' figures of that kind, or a note where the kind was never timed."""
    import benchmarking.runs as runs

    monkeypatch.setattr(runs.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runs, "git_commit", lambda: "abc1234")
    fake = {"time_training": {"seconds_per_iteration": 4.4, "peak_rss_gib": 1.2, "precision": "fp32"},
            "time_inference": {"seconds_per_volume": 12.2, "peak_rss_gib": 1.6, "precision": "fp32"}}  # fmt: skip
    monkeypatch.setattr(runs, "run_isolated", lambda kind, **kwargs: dict(fake[kind]))
    describe = runs.cpu_description
    for name, vendor_id, flags, kind, seconds in (
        ("avx2", "AuthenticAMD", AVX2_EPYC, "AMD, AVX2, no AVX-512", 8.8),
        ("xeon", "GenuineIntel", AVX512_XEON, "Intel, AVX-512, no BF16", None),
    ):
        cpuinfo = _cpuinfo(tmp_path, name, vendor_id, "AMD EPYC" if name == "avx2" else "Intel(R) Xeon(R)", flags)
        monkeypatch.setattr(runs, "cpu_description", lambda path=cpuinfo: describe(path))
        path = runs.speed(patches=[[64, 64, 32]], with_baselines=False, results_dir=str(tmp_path / f"results_{name}"))
        with open(path) as handle:
            record = json.load(handle)
        assert record["cpu"]["kind"] == record["reference_machine"] == kind
        assert record["command"].endswith('speed --method dual_journal --patches "[[64,64,32]]" --with_baselines false')
        if seconds is None:
            assert record["reference"] is None and f"no figure for {kind}" in record["reference_note"]
        else:
            assert record["reference"]["seconds"]["train_64x64x32"] == seconds and "reference_note" not in record
        assert speed_reference(record) == (kind if seconds else f"{kind}: no figure", record["reference"])


def test_each_training_speed_row_is_named_by_the_checkpointing_it_ran(tmp_path, monkeypatch):
    """A training row's variant says whether activation checkpointing ran, whatever train.json's default is, and
    ``defaults`` marks the row with train.json's settings (at 9d3d668 the row called ``activation checkpointing``
    had run train.json's default, which had become ``false``)."""
    import benchmarking.runs as runs

    monkeypatch.setattr(runs.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runs, "git_commit", lambda: "abc1234")
    monkeypatch.setattr(runs, "resolve_precision", lambda setting, device: "bf16")
    ran = []

    def fake(kind, **kwargs):
        ran.append(kwargs["overrides"])
        return {"seconds_per_iteration": 1.0, "seconds_per_volume": 1.0, "peak_rss_gib": 1.0, "precision": "x"}

    monkeypatch.setattr(runs, "run_isolated", fake)
    with open(runs.speed(patches=[[64, 64, 32]], results_dir=str(tmp_path))) as handle:
        rows = [row for row in json.load(handle)["rows"] if row["probe"].startswith("train")]
    default = json.load(open("configs/train.json"))["activation_checkpointing"]
    assert [row["defaults"] for row in rows] == [True, False, False, False]
    for row, overrides in zip(rows, ran):
        assert row["variant"].startswith("activation checkpointing" if overrides["activation_checkpointing"]
                                         else "activations kept")  # fmt: skip
    assert [overrides["activation_checkpointing"] for overrides in ran[:4]] == [default, not default, default, default]
    assert ran[2]["train#trainer#cpu_allocator_cache"] is True and ran[3]["train#trainer#precision"] == "fp32"
    assert list(runs.training_speed_variants(True, False, True, False)) == ["activation checkpointing"]
    assert list(runs.training_speed_variants(False, True, True, False)) == [
        "activations kept", "activation checkpointing", "activations kept + allocator cache"
    ]  # fmt: skip
