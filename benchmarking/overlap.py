"""Under- or over-segmentation: the sensitivity and precision of each row's test predictions, paired with its
reference's. Dice alone cannot tell a method that misses foreground from one that adds it (issue 31 asks what
explains a seed method's miss).

Accuracy records made since the evaluation writes ``sensitivity`` and ``precision`` carry them per case; an older
record gets them from a ``rescore`` record: its final model scored again on its own test cases by
``python scripts/benchmark.py rescore --record docs/results/<record>.json``."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from benchmarking.report import Record, group_records, per_case, reference_key, row_label
from benchmarking.runs import (
    CONFIG_DIR,
    bundle_command,
    read_metrics,
    rescored_header,
    rescoring_settings,
    run_logged,
    write_json,
)
from benchmarking.statistics import bootstrap_interval, format_interval, paired_differences

RATES = ("sensitivity", "precision")


def rescore(record: str, results_dir: str = "docs/results") -> str:
    """Score the final model of the accuracy record ``record`` again on its test cases with this commit's evaluation
    (every ``metrics.csv`` column, sensitivity and precision included; no figures). Needs the run's folder
    (``runs/benchmark/<name>/``: model and split lists) on this machine. ``max_dice_change`` is the largest per-case
    difference from the record's Dice (0 when the evaluation scores the model as it did). Writes
    ``<results_dir>/rescore_<record name>.json``; returns its path."""
    source, configs, overrides, run_dir = rescoring_settings(record)
    out = os.path.join(run_dir, "rescore")
    os.makedirs(out, exist_ok=True)
    command = bundle_command("run", configs + [f"{CONFIG_DIR}/evaluate.json"],
                             {**overrides, "output_dir": out, "figure_slices": 0})  # fmt: skip
    run_logged(command, os.path.join(out, "rescore.log"))
    metrics = read_metrics(out)
    before = {row["case"]: row["dice"] for row in source["per_case"]}
    after = {row["case"]: row["dice"] for row in metrics["per_case"]}
    if set(before) != set(after):
        raise ValueError(f"{record}: rescoring scored cases {sorted(after)}, the record {sorted(before)}.")
    name = os.path.splitext(os.path.basename(record))[0]
    invocation = f"python scripts/benchmark.py rescore --record {os.path.relpath(record)}"
    result = {**rescored_header("rescore", record, source, invocation),
              "max_dice_change": max(abs(after[case] - before[case]) for case in before), **metrics}  # fmt: skip
    return write_json(result, results_dir, f"rescore_{name}")


def with_rates(accuracy: Sequence[Tuple[str, Record]], rescores: Sequence[Tuple[str, Record]]
               ) -> List[Tuple[str, Record]]:  # fmt: skip
    """The accuracy records that have per-case sensitivity and precision: their own, else those of the rescore
    record made from them (matched by file name); records with neither are left out."""
    rescored = {os.path.basename(r["record"]): r for _, r in rescores}
    kept = []
    for name, record in accuracy:
        rows = record["per_case"]
        if not all(rate in rows[0] for rate in RATES):
            source = rescored.get(name)
            if source is None:
                continue
            rates = {row["case"]: row for row in source["per_case"]}
            rows = [{**row, **{rate: rates[row["case"]][rate] for rate in RATES}} for row in rows]
        kept.append((name, {**record, "per_case": rows}))
    return kept


def _mean(scores: Dict[int, Dict[str, float]]) -> float:
    """Mean over seeds of the per-seed mean over cases, ``nan`` cases left out."""
    return float(np.mean([np.nanmean(list(values.values())) for values in scores.values()]))


def paired_rate(method: Dict[int, Dict[str, float]], reference: Dict[int, Dict[str, float]]
                ) -> Optional[Dict[str, Any]]:  # fmt: skip
    """The paired difference of one rate (``{seed: {case: value}}``, ``nan`` where undefined) on the (seed, case)
    pairs where both are defined, with its :func:`bootstrap_interval`; None when no such pair exists."""
    common = set(method) & set(reference)
    if not common:
        return None
    defined = {seed: {case: value for case, value in method[seed].items()
                      if not np.isnan(value) and not np.isnan(reference[seed].get(case, np.nan))}
               for seed in common}  # fmt: skip
    defined = {seed: values for seed, values in defined.items() if values}
    if not defined:
        return None
    reference = {seed: {case: reference[seed][case] for case in values} for seed, values in defined.items()}
    return bootstrap_interval(paired_differences(defined, reference))


def overlap_rows(records: Sequence[Tuple[str, Record]]) -> Dict[Tuple[str, int], List[List[str]]]:
    """Per (protocol, K): one table row per group of ``records`` (:func:`with_rates` output) whose seeds all carry
    the rates: label, seeds, mean sensitivity and precision (%), the reference and Δ of each with its interval."""
    groups = group_records(records)
    tables: Dict[Tuple[str, int], List[List[str]]] = {}
    for key in sorted(groups):
        protocol, k, method, variant = key
        row = [row_label(method, variant), ", ".join(map(str, sorted(groups[key])))]
        scores = {rate: per_case(groups[key], rate) for rate in RATES}
        row += [f"{_mean(scores[rate]) * 100:.1f}" for rate in RATES]
        reference = reference_key(groups, key)
        results = None
        if reference is not None and reference in groups:
            results = [paired_rate(scores[rate], per_case(groups[reference], rate)) for rate in RATES]
        if results is None or None in results:
            row += ["–", "–", "–"]
        else:
            row += [row_label(reference[2], reference[3])] + [format_interval(result, 100) for result in results]
        tables.setdefault((protocol, k), []).append(row)
    return tables


def overlap_sections(accuracy: Sequence[Tuple[str, Record]], rescores: Sequence[Tuple[str, Record]]) -> List[str]:
    """Markdown lines: per protocol and K, the sensitivity / precision table of :func:`overlap_rows`, then the
    rescore records' sources."""
    tables = overlap_rows(with_rates(accuracy, rescores))
    if not tables:
        return []
    lines = [
        "## Missing or adding foreground: sensitivity and precision",
        "",
        "Per test case, sensitivity |P∩G| / |G| (how much of the atrium the prediction covers) and precision",
        "|P∩G| / |P| (how much of the prediction is atrium); in %, the mean over cases (an empty prediction has no",
        "precision and is left out of it), then over seeds. Δ is paired per case with the row's reference, as Δ Dice",
        "above, with its 95 % bootstrap interval. A row below its reference in sensitivity but not in precision",
        "misses foreground; the reverse adds it. Only rows whose every seed has the rates: records made before the",
        "evaluation wrote them get them from a rescore record (their final model scored again on the same cases).",
        "",
    ]
    for (protocol, k), rows in sorted(tables.items()):
        lines += [
            f"### `{protocol}` protocol, K = {k}",
            "",
            "| method | seeds | sensitivity | precision | reference | Δ sensitivity [95 % CI] "
            "| Δ precision [95 % CI] |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    for name, r in rescores:
        lines.append(f"- `{name}`: model of `{os.path.basename(r['record'])}` (commit {r['model_commit']}) scored at "
                     f"commit {r['commit']}, {r['hardware']}; largest per-case Dice change "
                     f"{r['max_dice_change']:.1e}; command: `{r['command']}`")  # fmt: skip
    return lines + [""]
