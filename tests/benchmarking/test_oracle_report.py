"""The oracle section of the report on hand-made records: rows paired per case, and the finding it states."""

import numpy as np

from benchmarking.oracle_report import oracle_finding, oracle_sections

CASES = [f"case{i:02d}" for i in range(20)]


def _record(kind, method, dice, seed=1337):
    record = {"kind": kind, "method": method, "protocol": "cpu", "num_labeled": 8, "seed": seed, "commit": "abc1234",
              "hardware": "test CPU", "command": f"run {method}", "per_case": [
                  {"case": case, "dice": value} for case, value in zip(CASES, dice)]}  # fmt: skip
    if kind == "oracle":
        record.update(
            seconds_per_iteration=3.5,
            notes="",
            reference={"repository": "yulequan/UA-MT", "commit": "88ed29a" + "0" * 33, "script": "train.py"},
        )
    return (f"{kind}_{method}_{seed}.json", record)


def _sections(oracle_mt, oracle_sup, our_mt, our_sup):
    oracle = [_record("oracle", "mean_teacher", oracle_mt), _record("oracle", "supervised", oracle_sup)]
    ours = [_record("accuracy", "mean_teacher", our_mt), _record("accuracy", "supervised_vnet", our_sup)]
    return "\n".join(oracle_sections(oracle, ours))


def test_a_gain_of_the_authors_code_that_ours_lacks_points_to_the_plug_in():
    base = np.linspace(0.6, 0.9, 20)
    noise = np.where(np.arange(20) % 2, 0.01, -0.01)
    text = _sections(base + 0.05, base, base + noise, base)
    assert "| authors' mean_teacher | 1337 | 80.00 | 0/20 | authors' supervised | +5.00 [+5.00, +5.00] | 20/20" in text
    assert "| our mean_teacher | 1337 | 75.00 | 0/20 | our supervised_vnet | +0.00 [" in text
    assert "| authors' mean_teacher | 1337 | 80.00 | 0/20 | our mean_teacher | +5.00 [" in text
    assert "points to a defect in our plug-in" in text and "(1 seed;" in text


def test_no_gain_of_the_authors_code_supports_the_protocol_explanation():
    base = np.linspace(0.6, 0.9, 20)
    noise = np.where(np.arange(20) % 2, 0.02, -0.02)
    failed = base.copy()
    failed[3] = 0.3  # one failure of the authors' supervised run: counted, and left out of the last column
    text = _sections(base + noise, failed, base, base)
    assert "| 1/20 | our supervised_vnet |" in text  # the authors' supervised row against ours
    assert "(19/20)" in text and "supports the protocol explanation" in text


def test_finding_needs_an_interval_not_a_mean():
    above = {"mean": 0.03, "low": 0.01, "high": 0.05}
    unclear = {"mean": 0.03, "low": -0.01, "high": 0.07}
    assert "defect in our plug-in" in oracle_finding(above, unclear, 3)
    assert "Both" in oracle_finding(above, above, 3) and "seed" not in oracle_finding(above, above, 3)
    assert "protocol explanation" in oracle_finding(unclear, unclear, 3)
    assert "not the weaker" in oracle_finding(unclear, above, 2)
    assert oracle_sections([], []) == []


def test_a_stronger_supervised_pipeline_of_the_authors_is_named():
    base = np.linspace(0.6, 0.9, 20)
    noise = np.where(np.arange(20) % 2, 0.02, -0.02)
    text = _sections(base + 0.05 + noise, base + 0.05, base, base)  # their pipeline 5 points above ours, no MT gain
    assert "| authors' supervised | 1337 | 80.00 | 0/20 | our supervised_vnet | +5.00 [+5.00, +5.00] | 20/20" in text
    assert "supports the protocol explanation" in text
    assert "supervised-only run is above our supervised_vnet (+5.00 [+5.00, +5.00])" in text


def test_our_run_with_the_authors_initialisation_is_paired_and_named_in_the_finding():
    """Our ``fp32_torch_init`` runs get their own rows; when the authors' supervised run is not separable from ours
    initialised as theirs, the finding says the initialisation accounts for the gap; when it stays above, only part."""
    base = np.linspace(0.6, 0.9, 20)
    noise = np.where(np.arange(20) % 2, 0.02, -0.02)
    oracle = [_record("oracle", "mean_teacher", base + 0.05 + noise), _record("oracle", "supervised", base + 0.05)]

    def init_runs(sup_gap):
        runs = [_record("accuracy", "mean_teacher", base), _record("accuracy", "supervised_vnet", base)]
        for method, dice in (
            ("mean_teacher", base + 0.05 - sup_gap + noise),
            ("supervised_vnet", base + 0.05 - sup_gap),
        ):
            name, record = _record("accuracy", method, dice)
            record["variant"] = "fp32_torch_init"
            runs.append((name.replace(".json", "_init.json"), record))
        name, record = _record("accuracy", "supervised_vnet", base - 0.01)
        record["variant"] = "fp32"
        return runs + [(name.replace(".json", "_fp32.json"), record)]

    text = "\n".join(oracle_sections(oracle, init_runs(sup_gap=0.0)))
    assert "| our supervised_vnet [fp32_torch_init] | 1337 | 80.00 | 0/20 | our supervised_vnet [fp32] | +6.00" in text
    assert (
        "the initialisation puts our supervised_vnet [fp32_torch_init] above our supervised_vnet [fp32] (+6.00" in text
    )
    assert (
        "| our mean_teacher [fp32_torch_init] | 1337 | 80.00 | 0/20 | our supervised_vnet [fp32_torch_init] |" in text
    )
    assert "| authors' supervised | 1337 | 80.00 | 0/20 | our supervised_vnet [fp32_torch_init] | +0.00" in text
    assert "supervised-only run is above our supervised_vnet [fp32] (+6.00 [+6.00, +6.00])" in text
    assert "theirs is not separable from our supervised_vnet [fp32_torch_init] (+0.00" in text
    assert "the initialisation accounts for the gap" in text
    text = "\n".join(oracle_sections(oracle, init_runs(sup_gap=0.03)))
    assert "theirs is above our supervised_vnet [fp32_torch_init] (+3.00 [+3.00, +3.00])" in text
    assert "explains part of the gap at most" in text
