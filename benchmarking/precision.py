"""bf16 against fp32 on LA: does the faster precision change the result?

* :func:`agreement` (``python scripts/benchmark.py agreement --record docs/results/<accuracy record>.json``) scores
  one accuracy run's final model on its test cases once per precision (``--validate#precision``), keeping the
  predicted masks, and records the per-case Dice between the masks of the two precisions.
* :func:`default_precision` (``python scripts/benchmark.py default_precision --seed 0``) trains the README's first
  command (``configs/train.json`` on the embedded default data) once per precision with the same seed and scores
  each final model in fp32 on the data's validation cases.
* :func:`precision_sections` is the section of ``docs/RESULTS.md``: training in bf16 (the protocol's default)
  against the same runs trained with ``--variant fp32`` (same method, K and seeds; paired per case), and the mask
  agreement records.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from benchmarking.report import failure_count, group_records, per_case, source_line
from benchmarking.runs import (
    CONFIG_DIR,
    bundle_command,
    display_command,
    git_commit,
    hardware,
    read_metrics,
    rescored_header,
    rescoring_settings,
    run_logged,
    write_json,
)
from benchmarking.statistics import bootstrap_interval, format_interval, paired_differences, seed_summary

Record = Dict[str, Any]


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of the foreground (class > 0) of two class maps of one shape; 1 when both are empty."""
    if a.shape != b.shape:
        raise ValueError(f"masks of shapes {a.shape} and {b.shape} cannot be compared.")
    fa, fb = a > 0, b > 0
    total = int(fa.sum()) + int(fb.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(fa, fb).sum()) / total


def agreement(record: str, precisions: Sequence[str] = ("fp32", "bf16"), results_dir: str = "docs/results") -> str:
    """Evaluate the final model of the accuracy record ``record`` on its test cases under each of ``precisions``
    (the first is the reference), writing the masks, and record the per-case mask Dice of every other precision
    against the first. Needs the run's folder (``runs/benchmark/<name>/``: model and split lists) on this machine.
    Writes ``<results_dir>/precision_agreement_<record name>.json``; returns its path."""
    if len(precisions) < 2 or len(set(precisions)) != len(precisions):
        raise ValueError(f"precisions {list(precisions)}: need two or more distinct precisions.")
    source, configs, overrides, run_dir = rescoring_settings(record)
    masks: Dict[str, Dict[str, str]] = {}
    runs: Dict[str, Record] = {}
    for precision in precisions:
        out = os.path.join(run_dir, f"agreement_{precision}")
        os.makedirs(out, exist_ok=True)
        settings = {**overrides, "output_dir": out, "predictions_dir": os.path.join(out, "predictions"),
                    "validate#precision": precision}  # fmt: skip
        command = bundle_command("run", configs + [f"{CONFIG_DIR}/evaluate.json"], settings)
        start = time.perf_counter()
        run_logged(command, os.path.join(out, "agreement.log"))
        metrics = read_metrics(out)
        runs[precision] = {"seconds": time.perf_counter() - start, "summary": metrics["summary"],
                           "dice": {row["case"]: row["dice"] for row in metrics["per_case"]}}  # fmt: skip
        masks[precision] = {case: os.path.join(out, "predictions", f"{case}.npz") for case in runs[precision]["dice"]}
    reference, cases = precisions[0], sorted(runs[precisions[0]]["dice"])
    rows = []
    for case in cases:
        ref_mask = np.load(masks[reference][case])["pred"]
        row: Record = {"case": case, **{f"dice_{p}": runs[p]["dice"][case] for p in precisions}}
        for other in precisions[1:]:
            row[f"mask_dice_{other}_vs_{reference}"] = mask_dice(np.load(masks[other][case])["pred"], ref_mask)
        rows.append(row)
    name = os.path.splitext(os.path.basename(record))[0]
    result = {
        **rescored_header(
            "precision_agreement",
            record,
            source,
            f"python scripts/benchmark.py agreement --record {os.path.relpath(record)}",
        ),
        "precisions": list(precisions),
        "seconds": {p: runs[p]["seconds"] for p in precisions},
        "summary": {p: runs[p]["summary"] for p in precisions},
        "min_mask_dice": {o: min(r[f"mask_dice_{o}_vs_{reference}"] for r in rows) for o in precisions[1:]},
        "per_case": rows,
    }
    return write_json(result, results_dir, f"precision_agreement_{name}")


def default_precision(
    seed: int = 0,
    precisions: Sequence[str] = ("fp32", "bf16"),
    results_dir: str = "docs/results",
    runs_dir: str = "runs/benchmark",
    notes: str = "",
) -> str:
    """Train the README's first command (``configs/train.json``, embedded default data) with ``--seed seed`` once
    per training precision (``--train#trainer#precision``) and score each final ``model.pt`` in fp32 on the data's
    validation cases (``configs/evaluate.json``), so that only the training precision differs. A finished training
    (its ``train_info.json``) is reused. Writes ``<results_dir>/precision_default_seed<seed>.json`` (kind
    ``precision_default``: per precision the per-case Dice, training seconds and command); returns its path."""
    if len(precisions) < 2 or len(set(precisions)) != len(precisions):
        raise ValueError(f"precisions {list(precisions)}: need two or more distinct precisions.")
    configs = [f"{CONFIG_DIR}/train.json"]
    runs: Dict[str, Record] = {}
    for precision in precisions:
        run_dir = os.path.relpath(os.path.join(runs_dir, f"default_{precision}_seed{seed}"))
        settings = {"seed": seed, "train#trainer#precision": precision, "output_dir": run_dir,
                    "model_dir": os.path.join(run_dir, "models")}  # fmt: skip
        train_command = bundle_command("training", configs, settings)
        info_path = os.path.join(run_dir, "train_info.json")
        if not os.path.isfile(info_path):
            os.makedirs(run_dir, exist_ok=True)
            commit = git_commit()  # taken before training, as HEAD may move during the run
            seconds = run_logged(train_command, os.path.join(run_dir, "benchmark.log"))
            write_json({"train_seconds": seconds, "hardware": hardware(), "commit": commit}, run_dir, "train_info")
        with open(info_path) as handle:
            info = json.load(handle)
        eval_dir = os.path.join(run_dir, "eval")
        eval_settings = {**settings, "output_dir": eval_dir, "validate#precision": "fp32"}
        run_logged(bundle_command("run", configs + [f"{CONFIG_DIR}/evaluate.json"], eval_settings),
                   os.path.join(run_dir, "benchmark.log"))  # fmt: skip
        metrics = read_metrics(eval_dir)
        runs[precision] = {
            "command": display_command(train_command),
            "commit": info["commit"],
            "hardware": info["hardware"],
            "train_seconds": info["train_seconds"],
            "summary": metrics["summary"],
            "dice": {row["case"]: row["dice"] for row in metrics["per_case"]},
        }
    record = {
        "kind": "precision_default",
        "seed": seed,
        "precisions": list(precisions),
        "evaluation": "the embedded data's validation cases, final weights, scored in fp32",
        "command": f"python scripts/benchmark.py default_precision --seed {seed}",
        "notes": notes,
        "runs": runs,
    }
    return write_json(record, results_dir, f"precision_default_seed{seed}")


def precision_sections(
    accuracy: Sequence[Tuple[str, Record]],
    agreements: Sequence[Tuple[str, Record]],
    defaults: Sequence[Tuple[str, Record]] = (),
) -> List[str]:
    """Markdown lines: bf16-trained runs against their ``fp32`` variant (paired per seed and case), the embedded
    default's pairs (:func:`default_precision` records) and the mask agreement records. Empty when there is none."""
    groups = group_records(accuracy)
    pairs = [(key, (key[0], key[1], key[2], "")) for key in groups if key[3] == "fp32"]
    pairs = [
        (fp32, default) for fp32, default in pairs if default in groups and set(groups[fp32]) & set(groups[default])
    ]
    if not pairs and not agreements and not defaults:
        return []
    lines = [
        "## Precision: bf16 against fp32",
        "",
        "Training: the protocol's bf16 autocast runs against the same method, K and seeds trained with",
        "`--variant fp32 --train#trainer#precision fp32` (both scored in fp32); Δ Dice (bf16 − fp32) is paired per",
        "seed and test case, with the bootstrap interval of the accuracy tables. Inference: one trained model",
        "scored on its 20 test cases under each precision (`--validate#precision`); mask Dice is the per-case Dice",
        "between the two precisions' masks (1 = identical); its seconds are wall time, the machine possibly shared",
        "with other benchmark runs (see the speed section for timing).",
        "",
    ]
    if pairs:
        lines += [
            "| protocol | K | method | seeds | bf16 Dice | fp32 Dice | Δ Dice (bf16 − fp32) [95 % CI] | verdict "
            "| failures: Dice < 50 (per seed) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for fp32_key, default_key in sorted(pairs):
            seeds = sorted(set(groups[fp32_key]) & set(groups[default_key]))
            bf16_scores = {s: v for s, v in per_case(groups[default_key]).items() if s in seeds}
            fp32_scores = {s: v for s, v in per_case(groups[fp32_key]).items() if s in seeds}
            result = bootstrap_interval(paired_differences(bf16_scores, fp32_scores))
            cells = []
            for scores in (bf16_scores, fp32_scores):
                summary = seed_summary([100 * float(np.mean(list(scores[s].values()))) for s in seeds])
                cells.append(f"{summary['mean']:.2f} ± {summary['sd']:.2f}")
            verdict = "equal within the interval" if result["low"] <= 0 <= result["high"] else "differ"
            failures = f"bf16 {failure_count(bf16_scores)}; fp32 {failure_count(fp32_scores)}"
            lines.append(f"| {fp32_key[0]} | {fp32_key[1]} | {fp32_key[2]} | {', '.join(map(str, seeds))} "
                         f"| {cells[0]} | {cells[1]} | {format_interval(result, 100)} | {verdict} "
                         f"| {failures} |")  # fmt: skip
        lines.append("")
    lines += default_lines(defaults)
    if agreements:
        lines += ["| record | model | precisions | min mask Dice (case) | mean mask Dice | Dice vs label "
                  "| seconds for the 20 cases |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, r in agreements:
            reference = r["precisions"][0]
            for other in r["precisions"][1:]:
                column = f"mask_dice_{other}_vs_{reference}"
                worst = min(r["per_case"], key=lambda row: row[column])
                mean = float(np.mean([row[column] for row in r["per_case"]]))
                dice = ", ".join(f"{p} {100 * r['summary'][p]['dice']['mean']:.2f}" for p in (reference, other))
                seconds = ", ".join(f"{p} {r['seconds'][p]:.0f}" for p in (reference, other))
                lines.append(f"| `{name}` | {r['method']} K = {r['num_labeled']} seed {r['seed']} "
                             f"(`{r['protocol']}`) | {other} vs {reference} | {worst[column]:.4f} ({worst['case']}) "
                             f"| {mean:.4f} | {dice} | {seconds} |")  # fmt: skip
        lines.append("")
        for name, r in agreements:
            lines.append(source_line(name, r, commit_note=f" (model trained at {r['model_commit']})"))
        lines.append("")
    return lines


def default_lines(defaults: Sequence[Tuple[str, Record]]) -> List[str]:
    """Markdown lines for :func:`default_precision` records: per pair of precisions (the record's first against each
    other), the seeds' mean validation Dice and the difference paired per seed and case. Empty without records."""
    if not defaults:
        return []
    reference = defaults[0][1]["precisions"][0]
    others = defaults[0][1]["precisions"][1:]
    lines = [
        "The README's first command (`configs/train.json`, embedded default data) trained once per precision with",
        "the same seed (`python scripts/benchmark.py default_precision --seed S`), each final model scored in fp32",
        "on the data's validation cases; Δ Dice is paired per seed and validation case:",
        "",
        "| training | seeds | precisions | Dice | Δ Dice [95 % CI] | verdict | mean train seconds "
        "| failures: Dice < 50 (per seed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for other in others:
        runs = {r["seed"]: r["runs"] for _, r in defaults if other in r["runs"] and reference in r["runs"]}
        seeds = sorted(runs)
        scores = {p: {s: runs[s][p]["dice"] for s in seeds} for p in (other, reference)}
        result = bootstrap_interval(paired_differences(scores[other], scores[reference]))
        cells = []
        for p in (other, reference):
            summary = seed_summary([100 * float(np.mean(list(scores[p][s].values()))) for s in seeds])
            cells.append(f"{summary['mean']:.2f} ± {summary['sd']:.2f}")
        seconds = ", ".join(
            f"{p} {np.mean([runs[s][p]['train_seconds'] for s in seeds]):.0f}" for p in (other, reference)
        )
        verdict = "equal within the interval" if result["low"] <= 0 <= result["high"] else "differ"
        lines.append(f"| embedded default | {', '.join(map(str, seeds))} | {other} − {reference} "
                     f"| {other} {cells[0]}, {reference} {cells[1]} | {format_interval(result, 100)} | {verdict} "
                     f"| {seconds} | {other} {failure_count(scores[other])}; {reference} "
                     f"{failure_count(scores[reference])} |")  # fmt: skip
    lines.append("")
    for name, r in defaults:
        first = r["runs"][r["precisions"][0]]
        lines.append(f"- `{name}`: commit {first['commit']}, {first['hardware']}; command: `{r['command']}`"
                     + (f"; {r['notes']}" if r.get("notes") else ""))  # fmt: skip
    lines.append("")
    return lines
