"""Failure counts (test cases with Dice < 50) and the paired difference where neither run fails, and which reference
runs a row is paired with, on hand-made records: no training."""

import re

import numpy as np
import pytest

from benchmarking.results_page import report
from benchmarking.runs import write_json
from benchmarking.statistics import failed_cases, paired_differences_without_failures

CASES = [f"c{i:02d}" for i in range(20)]


def _record(method, seed, dice, variant="", k=8, split=None):
    """An accuracy record of ``method`` scoring ``dice`` (``{case: Dice fraction}``) on the test cases."""
    rows = [{"case": case, "dice": value} for case, value in dice.items()]
    mean = float(np.mean(list(dice.values())))
    return {
        "kind": "accuracy", "method": method, "variant": variant, "protocol": "cpu", "num_labeled": k,
        "split": split or f"train: first 60 of train.list ({k} labeled); test: the remaining cases",
        "command": f"train {method}", "commit": "abc1234", "hardware": "test cpu", "seed": seed,
        "train_seconds": 600.0, "per_case": rows,
        "summary": {"dice": {"mean": mean}, "jaccard": {"mean": mean - 0.1}, "hd95": {"mean": 7.0},
                    "asd": {"mean": 2.0}},
    }  # fmt: skip


def _write(results, record):
    variant = f"_{record['variant']}" if record["variant"] else ""
    name = f"la_cpu_{record['method']}{variant}_k{record['num_labeled']}_seed{record['seed']}"
    write_json(record, str(results), name)


def _row(text, label):
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.split("|")[1:-1]]


def test_failed_cases_and_the_pairs_where_neither_run_fails():
    method = {1: {"a": 0.9, "b": 0.3, "c": 0.8}, 2: {"a": 0.45, "b": 0.7, "c": 0.6}, 3: {"a": 0.2, "b": 0.9, "c": 0.9}}
    reference = {
        1: {"a": 0.8, "b": 0.6, "c": 0.2},
        2: {"a": 0.7, "b": 0.4, "c": 0.5},
        3: {"a": 0.9, "b": 0.1, "c": 0.3},
    }
    assert failed_cases(method, 0.5) == {1: ["b"], 2: ["a"], 3: ["a"]}
    assert failed_cases(reference, 0.5) == {1: ["c"], 2: ["b"], 3: ["b", "c"]}  # Dice exactly 50 is no failure
    kept = paired_differences_without_failures(method, reference, 0.5)
    # seed 1 keeps a (b fails in the method, c in the reference), seed 2 keeps c; seed 3 has no pair left: dropped
    assert kept == {1: {"a": pytest.approx(0.1)}, 2: {"c": pytest.approx(0.1)}}
    with pytest.raises(ValueError, match="every paired case fails"):
        paired_differences_without_failures({3: method[3]}, {3: reference[3]}, 0.5)


def _independent_interval(kept, resamples=20000, seed=123):
    """Mean over seeds of each seed's mean difference, and a percentile bootstrap of it written without the report's
    code: per resample, each seed's cases drawn with replacement by ``Generator.choice``."""
    rng = np.random.default_rng(seed)
    values = [np.array(list(per_seed.values())) for per_seed in kept.values()]
    draws = [np.mean([rng.choice(v, size=len(v), replace=True).mean() for v in values]) for _ in range(resamples)]
    return np.mean([v.mean() for v in values]), np.percentile(draws, 2.5), np.percentile(draws, 97.5)


def test_report_counts_failures_and_pairs_the_cases_where_neither_run_fails(tmp_path):
    results = tmp_path / "results"
    rng = np.random.default_rng(0)
    scores = {"ducisc": {}, "supervised_vnet": {}}
    for seed in (1, 2, 3):
        reference = {case: float(value) for case, value in zip(CASES, rng.uniform(0.6, 0.9, len(CASES)))}
        method = {case: value + float(rng.normal(0.01, 0.03)) for case, value in reference.items()}
        reference["c03"], method["c03"] = 0.10, 0.85  # the reference fails on every seed, the method rescues it
        if seed == 2:
            method["c07"] = 0.30  # only the method fails
        if seed == 3:
            method["c11"], reference["c11"] = 0.40, 0.20  # both fail
        scores["ducisc"][seed], scores["supervised_vnet"][seed] = method, reference
        for name in scores:
            _write(results, _record(name, seed, scores[name][seed]))
    text = open(report(str(results), str(tmp_path / "RESULTS.md"), None)).read()
    row = _row(text, "ducisc")
    assert row[3] == "2/60 (0, 1, 1)" and _row(text, "supervised_vnet")[3] == "4/60 (1, 1, 2)"
    # the pairs kept: seed 1 without c03, seed 2 without c03 and c07, seed 3 without c03 and c11
    expected_kept = {
        seed: {case: scores["ducisc"][seed][case] - scores["supervised_vnet"][seed][case] for case in CASES
               if case not in {1: {"c03"}, 2: {"c03", "c07"}, 3: {"c03", "c11"}}[seed]}
        for seed in (1, 2, 3)
    }  # fmt: skip
    mean, low, high = (100 * v for v in _independent_interval(expected_kept))
    assert row[11].endswith(" (55/60)")
    shown = [float(number) for number in re.findall(r"[+-]\d+\.\d+", row[11])]
    assert shown[0] == pytest.approx(mean, abs=0.005)  # printed to 2 decimals
    # the same interval up to the Monte Carlo error of two independent bootstraps
    assert shown[1] == pytest.approx(low, abs=0.1) and shown[2] == pytest.approx(high, abs=0.1)
    assert high - low > 0.5  # a real interval, not a degenerate one
    # every case: the rescued c03 (+75 points on each seed) lifts the mean well above the one without failures
    everything = float(row[8].split()[0])
    assert everything == pytest.approx(
        100 * np.mean([np.mean([scores["ducisc"][s][c] - scores["supervised_vnet"][s][c] for c in CASES])
                       for s in (1, 2, 3)]), abs=0.005)  # fmt: skip
    assert everything > shown[0] + 3
    assert ("Failed cases (Dice < 50; on how many of the row's seeds): `ducisc` c07 (1/3), c11 (1/3); "
            "`supervised_vnet` c03 (3/3), c11 (1/3).") in text  # fmt: skip


def test_a_variant_row_is_paired_with_the_references_runs_of_the_same_variant(tmp_path):
    results = tmp_path / "results"
    flat = {case: 0.0 for case in CASES}
    for seed in (1, 2, 3):
        _write(results, _record("supervised_vnet", seed, {c: v + 0.70 for c, v in flat.items()}))
        _write(results, _record("supervised_vnet", seed, {c: v + 0.60 for c, v in flat.items()}, variant="fp32"))
        _write(results, _record("supervised", seed, {c: v + 0.80 for c, v in flat.items()}))
    _write(results, _record("ducisc", 1, {c: v + 0.66 for c, v in flat.items()}, variant="fp32"))  # one seed
    _write(results, _record("dycon", 2, {c: v + 0.75 for c, v in flat.items()}))
    _write(results, _record("dycon", 5, {c: v + 0.62 for c, v in flat.items()}, variant="fp32"))  # no seed 5 there
    _write(results, _record("mean_teacher", 3, {c: v + 0.72 for c, v in flat.items()}, variant="unramped"))
    _write(results, _record("dual_journal", 1, {c: v + 0.81 for c, v in flat.items()}, variant="fp32"))
    _write(results, _record("ducisc", 1, {c: v + 0.50 for c, v in flat.items()}, k=4))  # no K = 4 reference
    bound = _record("supervised_vnet", 1, {c: v + 0.90 for c, v in flat.items()}, k=60)
    _write(results, bound)
    targets = [{"protocol": "cpu", "k": 8, "methods": ["ducisc", "ducisc [fp32]"], "min_delta": 1.0,
                "interval_above_zero": True, "source": "issue 31"}]  # fmt: skip
    write_json({"kind": "targets", "targets": targets}, str(results), "targets")
    text = open(report(str(results), str(tmp_path / "RESULTS.md"), str(tmp_path / "figures"))).read()
    # DuCiSC and DyCON are single-V-Net methods: their reference is supervised_vnet, in their own precision variant
    assert _row(text, "ducisc [fp32]")[:4] == ["ducisc [fp32]", "1", "66.00", "0/20"]
    assert _row(text, "ducisc [fp32]")[7:12] == ["supervised_vnet [fp32]", "+6.00 [+6.00, +6.00]", "20/20", "above",
                                                 "+6.00 [+6.00, +6.00] (20/20)"]  # fmt: skip
    assert _row(text, "dycon")[7:9] == ["supervised_vnet", "+5.00 [+5.00, +5.00]"]  # bf16 default with default
    assert _row(text, "dycon [fp32]")[7:9] == ["supervised_vnet [fp32] (no common seed)", "–"]
    # a variant the reference was not run in is paired with the reference's default runs
    assert _row(text, "mean_teacher [unramped]")[7:9] == ["supervised_vnet", "+2.00 [+2.00, +2.00]"]
    assert _row(text, "dual_journal [fp32]")[7:9] == ["supervised", "+1.00 [+1.00, +1.00]"]  # no fp32 supervised
    # a target names the row as the table does: the fp32 runs answer it where the default runs do not exist
    goal = "at least +1.00 Dice above its reference with the interval above 0"
    assert f"- Target (issue 31): `ducisc` {goal}: **not measured**." in text
    assert (
        f"- Target (issue 31): `ducisc [fp32]` {goal}: **met** (+6.00 [+6.00, +6.00] vs `supervised_vnet [fp32]`)."
        in text
    )
    k4 = text[text.index("### K = 4 labeled") : text.index("### K = 8 labeled")]
    assert _row(k4, "ducisc")[7:9] == ["supervised_vnet (not run)", "–"]
    # the fully labeled bound is a default run: only rows paired with the default reference get a share of its gap
    assert "Upper bound: `supervised_vnet` with all 60 training cases labeled reaches 90.00 Dice" in text
    assert "(Δ Dice / gap): dycon 25 %; mean_teacher [unramped] 10 %." in text
    assert "supervised_vnet [fp32]` with all" not in text
    assert (tmp_path / "figures" / "la_cpu_k8.png").stat().st_size > 10000
    # the precision section pairs an fp32 row with its method's default runs only on common seeds (none for dycon)
    assert "| cpu | 8 | supervised_vnet | 1, 2, 3 | 70.00 ± 0.00 | 60.00 ± 0.00 | +10.00 [+10.00, +10.00]" in text
    assert "| cpu | 8 | dycon |" not in text


def test_precision_rows_count_each_precisions_failures():
    from benchmarking.precision import precision_sections

    def record(variant, seed, dice):
        per_case = [{"case": f"c{i}", "dice": value} for i, value in enumerate(dice)]
        return f"{variant}{seed}.json", {"kind": "accuracy", "protocol": "cpu", "num_labeled": 8, "method": "dycon",
                                         "variant": variant, "seed": seed, "per_case": per_case}  # fmt: skip

    records = [record("", 1, [0.4, 0.9, 0.8]), record("fp32", 1, [0.45, 0.3, 0.8]),
               record("", 2, [0.6, 0.9, 0.8]), record("fp32", 2, [0.7, 0.9, 0.49])]  # fmt: skip
    row = next(line for line in precision_sections(records, []) if line.startswith("| cpu | 8 | dycon |"))
    assert row.endswith("| bf16 1/6 (1, 0); fp32 3/6 (2, 1) |")
