"""Sensitivity / precision section of the report on hand-made records: rates taken from the records or from rescore
records, paired differences against the reference with ``nan`` (undefined) cases left out."""

import json
import math

import pytest

from benchmarking.overlap import overlap_rows, overlap_sections, paired_rate, rescore, with_rates


def _record(method, seed, sensitivity, precision=None, variant="", k=8):
    """An accuracy record of cases c0, c1, ...; rates per case (``precision=None`` leaves both out)."""
    rows = [{"case": f"c{i}", "dice": 0.8} for i in range(len(sensitivity))]
    if precision is not None:
        for row, s, p in zip(rows, sensitivity, precision):
            row.update(sensitivity=s, precision=p)
    return {"kind": "accuracy", "protocol": "cpu", "num_labeled": k, "method": method, "variant": variant,
            "seed": seed, "per_case": rows}  # fmt: skip


def _rescore(name, sensitivity, precision):
    rows = [{"case": f"c{i}", "dice": 0.8, "sensitivity": s, "precision": p}
            for i, (s, p) in enumerate(zip(sensitivity, precision))]  # fmt: skip
    return {"kind": "rescore", "record": f"docs/results/{name}", "model_commit": "abc1234", "commit": "def5678",
            "hardware": "test cpu", "max_dice_change": 0.0, "command": "python scripts/benchmark.py rescore",
            "per_case": rows}  # fmt: skip


def test_rates_come_from_the_record_else_from_its_rescore():
    old = ("la_cpu_dycon_k8_seed7.json", _record("dycon", 7, [0.0, 0.0]))
    new = ("la_cpu_dycon_k8_seed1337.json", _record("dycon", 1337, [0.5, 0.6], [0.9, 0.8]))
    lost = ("la_cpu_dycon_k8_seed2024.json", _record("dycon", 2024, [0.0, 0.0]))
    kept = with_rates([old, new, lost], [("rescore_x.json", _rescore(old[0], [0.7, 0.4], [1.0, math.nan]))])
    assert [name for name, _ in kept] == [old[0], new[0]]
    assert [row["sensitivity"] for row in kept[0][1]["per_case"]] == [0.7, 0.4]
    assert kept[0][1]["per_case"][0]["dice"] == 0.8 and math.isnan(kept[0][1]["per_case"][1]["precision"])
    assert "sensitivity" not in old[1]["per_case"][0]  # the record itself is left as it was
    assert kept[1][1]["per_case"] == new[1]["per_case"]


def test_paired_rate_leaves_out_undefined_cases():
    method = {7: {"a": 0.6, "b": math.nan, "c": 0.9}, 1337: {"a": 0.5, "b": 0.5, "c": 0.5}}
    reference = {7: {"a": 0.8, "b": 0.7, "c": 0.9}, 1337: {"a": 0.7, "b": 0.7, "c": math.nan}}
    result = paired_rate(method, reference)
    # seed 7: a -0.2, c 0.0 -> -0.1; seed 1337: a -0.2, b -0.2 -> -0.2; mean over seeds -0.15
    assert result["mean"] == pytest.approx(-0.15)
    assert result["low"] <= result["mean"] <= result["high"] <= 0.0
    assert result["cases"] == 3 and result["losses"] == 2 and result["wins"] == 0
    assert paired_rate({7: {"a": math.nan}}, {7: {"a": 0.5}}) is None
    assert paired_rate({7: {"a": 0.5}}, {1337: {"a": 0.5}}) is None


def test_rows_pair_each_method_with_its_reference_per_seed():
    records = [
        ("d7", _record("dycon", 7, [0.6, 0.8], [0.9, 1.0], variant="v")),
        ("d1", _record("dycon", 1337, [0.7, 0.7], [0.9, 0.9], variant="v")),
        ("s7", _record("supervised_vnet", 7, [0.8, 0.9], [0.8, 0.9], variant="v")),
        ("s1", _record("supervised_vnet", 1337, [0.8, 0.8], [0.9, 0.8], variant="v")),
        ("u", _record("ua_mt", 7, [0.5, 0.5], [0.5, 0.5], k=4)),  # its reference has no run at K = 4
    ]
    tables = overlap_rows(records)
    assert sorted(tables) == [("cpu", 4), ("cpu", 8)]
    dycon, supervised = tables[("cpu", 8)]
    # sensitivity: dycon (0.7 + 0.7) / 2 = 70.0, reference 82.5; Δ per seed -0.15, -0.10 -> -12.5
    assert dycon[:5] == ["dycon [v]", "7, 1337", "70.0", "92.5", "supervised_vnet [v]"]
    assert dycon[5].startswith("-12.50 [") and dycon[6].startswith("+7.50 [")
    assert supervised[:4] == ["supervised_vnet [v]", "7, 1337", "82.5", "85.0"] and supervised[4:] == ["–"] * 3
    assert tables[("cpu", 4)] == [["ua_mt", "7", "50.0", "50.0", "–", "–", "–"]]


def test_section_lists_rescore_sources_and_is_empty_without_rates():
    old = ("la_cpu_dycon_k8_seed7.json", _record("dycon", 7, [0.0, 0.0]))
    assert overlap_sections([old], []) == []
    rescore = ("rescore_la_cpu_dycon_k8_seed7.json", _rescore(old[0], [0.7, 0.4], [1.0, 0.9]))
    text = "\n".join(overlap_sections([old], [rescore]))
    assert "### `cpu` protocol, K = 8" in text and "| dycon | 7 | 55.0 | 95.0 | – | – | – |" in text
    assert "`rescore_la_cpu_dycon_k8_seed7.json`: model of `la_cpu_dycon_k8_seed7.json` (commit abc1234)" in text


def test_rescore_refuses_other_records_and_missing_runs_before_scoring(tmp_path):
    probe = tmp_path / "term_probe.json"
    probe.write_text(json.dumps({"kind": "term_probe"}))
    with pytest.raises(ValueError, match="term_probe.json: not an accuracy record"):
        rescore(str(probe), results_dir=str(tmp_path))
    record = tmp_path / "la_cpu_dycon_k8_seed7.json"
    run = tmp_path / "runs" / "la_cpu_dycon_k8_seed7"
    record.write_text(json.dumps({**_record("dycon", 7, [0.5]), "config": {"model_dir": str(run / "models")}}))
    with pytest.raises(FileNotFoundError, match="la_cpu_dycon_k8_seed7.json: the run's files are not here"):
        rescore(str(record), results_dir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["la_cpu_dycon_k8_seed7.json", "term_probe.json"]
