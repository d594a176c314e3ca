"""The accuracy part of ``docs/RESULTS.md``: one row per method over its seeds, each semi-supervised row against its
supervised reference with a paired per-case interval (:mod:`benchmarking.statistics`), and a figure per setting."""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from benchmarking.statistics import (
    bootstrap_interval,
    case_means,
    excludes_zero,
    failed_cases,
    format_interval,
    paired_differences,
    paired_differences_without_failures,
    seed_summary,
)
from bundle.methods.presets import reference_of

#: Each method's own paper on the full LA protocol (the standard 20-case test set): paper 000 (journal) Table 1 for
#: the dual-network method and its V-Net supervised-only row (Dice only); paper 002 Table I for DuCiSC; paper 003
#: Table 3 (V-Net backbone) for DyCON. Baselines are left out: the papers that cite them disagree on their numbers.
PAPER_LA_DICE = {
    ("dual_journal", 8): 89.95,
    ("dual_journal", 16): 90.90,
    ("supervised_vnet", 8): 51.76,
    ("supervised_vnet", 16): 77.48,
    ("ducisc", 8): 91.81,
    ("ducisc", 16): 92.11,
    ("dycon", 8): 91.58,
}

#: a test case segmented with Dice below this (50 %) counts as a failure.
FAILURE_DICE = 0.5

Record = Dict[str, Any]
GroupKey = Tuple[str, int, str, str]  # protocol, K, method, variant


def group_records(records: Sequence[Tuple[str, Record]]) -> Dict[GroupKey, Dict[int, Tuple[str, Record]]]:
    """Accuracy records grouped by protocol, K, method and variant, then keyed by seed."""
    groups: Dict[GroupKey, Dict[int, Tuple[str, Record]]] = {}
    for name, record in records:
        key = (record["protocol"], record["num_labeled"], record["method"], record.get("variant", ""))
        groups.setdefault(key, {})[record["seed"]] = (name, record)
    return groups


def per_case(by_seed: Dict[int, Tuple[str, Record]], metric: str = "dice") -> Dict[int, Dict[str, float]]:
    """``{seed: {case: metric}}`` of one group."""
    return {seed: {row["case"]: row[metric] for row in r["per_case"]} for seed, (_, r) in by_seed.items()}


def row_label(method: str, variant: str) -> str:
    """A row's name in the tables: the method, with its variant in brackets (``ducisc [fp32]``)."""
    return f"{method} [{variant}]" if variant else method


def _seed_cell(by_seed: Dict[int, Tuple[str, Record]], metric: str, scale: float) -> str:
    """``mean ± sd`` over the seeds (the mean alone for one seed: its sd is not defined)."""
    summary = seed_summary([r["summary"][metric]["mean"] * scale for _, r in by_seed.values()])
    return f"{summary['mean']:.2f}" + (f" ± {summary['sd']:.2f}" if summary["n"] > 1 else "")


def failure_cell(by_seed: Dict[int, Tuple[str, Record]]) -> str:
    """:func:`failure_count` of one row's records."""
    return failure_count(per_case(by_seed))


def failure_count(scores: Dict[int, Dict[str, float]]) -> str:
    """``total/scored (per seed, ...)`` of ``{seed: {case: dice}}``: the test cases with Dice below
    :data:`FAILURE_DICE` summed over the seeds, out of the seeds' scored cases, then per seed in seed order (no
    breakdown for one seed)."""
    failed = failed_cases(scores, FAILURE_DICE)
    counts = [len(failed[seed]) for seed in sorted(failed)]
    cell = f"{sum(counts)}/{sum(len(values) for values in scores.values())}"
    return cell + (f" ({', '.join(map(str, counts))})" if len(counts) > 1 else "")


def reference_key(groups, key: GroupKey) -> Optional[GroupKey]:
    """The group the row ``key`` is paired with (None for a reference itself): its reference method
    (:func:`reference_of`) at the same protocol and K, in the row's own variant where the reference was run in it (an
    ``fp32`` row with the reference's ``fp32`` runs), else the reference's default runs. The returned group may be
    missing from ``groups`` (the reference was not run)."""
    protocol, k, method, variant = key
    reference = reference_of(method)
    if reference is None:
        return None
    same_variant = (protocol, k, reference, variant)
    return same_variant if variant and same_variant in groups else (protocol, k, reference, "")


def comparison(groups, key: GroupKey) -> Optional[Dict[str, Any]]:
    """The paired Dice comparison of group ``key`` with its reference group (:func:`reference_key`), or None when
    there is no reference run with a seed in common. Besides the interval over every paired case, ``failures`` holds
    the same interval on the (seed, case) pairs where neither run fails (Dice >= :data:`FAILURE_DICE`; None when
    every pair has a failure) with ``pairs`` of ``of`` kept."""
    reference = reference_key(groups, key)
    if reference is None or reference not in groups:
        return None
    method_scores, reference_scores = per_case(groups[key]), per_case(groups[reference])
    if not set(method_scores) & set(reference_scores):
        return None
    return {"reference": row_label(reference[2], reference[3]), "reference_key": reference,
            **paired_result(method_scores, reference_scores)}  # fmt: skip


def paired_result(method: Dict[int, Dict[str, float]], reference: Dict[int, Dict[str, float]]) -> Dict[str, Any]:
    """Dice of ``method`` against ``reference`` (``{seed: {case: dice}}``, at least one seed in common): the
    ``differences`` and their :func:`bootstrap_interval`, and ``failures``: the same interval on the (seed, case)
    pairs where neither run fails (Dice >= :data:`FAILURE_DICE`) with ``pairs`` kept ``of`` all, None when every
    pair has a failure."""
    differences = paired_differences(method, reference)
    result = {"differences": differences, **bootstrap_interval(differences), "failures": None}
    try:
        kept = paired_differences_without_failures(method, reference, FAILURE_DICE)
    except ValueError:
        return result
    pairs = sum(len(values) for values in differences.values())
    result["failures"] = {**bootstrap_interval(kept), "pairs": sum(len(v) for v in kept.values()), "of": pairs}
    return result


def reference_cell(groups, key: GroupKey, result: Optional[Dict[str, Any]]) -> str:
    """The reference column: the run a row is paired with, or why it is not paired (``–`` for a reference)."""
    if result is not None:
        return result["reference"]
    reference = reference_key(groups, key)
    if reference is None:
        return "–"
    label = row_label(reference[2], reference[3])
    return f"{label} (no common seed)" if reference in groups else f"{label} (not run)"


def without_failures_cell(result: Optional[Dict[str, Any]]) -> str:
    """``Δ [CI] (kept/paired)`` of :func:`comparison`'s ``failures``, ``–`` where there is none."""
    if result is None:
        return "–"
    kept = result["failures"]
    if kept is None:
        return f"– (0/{sum(len(v) for v in result['differences'].values())})"
    return f"{format_interval(kept, 100)} ({kept['pairs']}/{kept['of']})"


def failure_lines(rows_by_label: Sequence[Tuple[str, Dict[int, Tuple[str, Record]]]]) -> List[str]:
    """One line naming, for each ``(row label, {seed: record})`` with failures, each failed test case and on how many
    of the row's seeds it fails."""
    rows = []
    for label, by_seed in rows_by_label:
        counts: Dict[str, int] = {}
        for cases in failed_cases(per_case(by_seed), FAILURE_DICE).values():
            for case in cases:
                counts[case] = counts.get(case, 0) + 1
        if counts:
            cases = ", ".join(f"{case} ({n}/{len(by_seed)})" for case, n in sorted(counts.items()))
            rows.append(f"`{label}` {cases}")
    if not rows:
        return []
    return [f"Failed cases (Dice < {100 * FAILURE_DICE:.0f}; on how many of the row's seeds): " + "; ".join(rows) + ".",
            ""]  # fmt: skip


def verdict(result: Dict[str, Any]) -> str:
    """``above`` / ``below`` the reference when the interval excludes 0, else ``not separable``."""
    if not excludes_zero(result):
        return "not separable"
    return "above" if result["low"] > 0 else "below"


def source_line(name: str, record: Record, lead: str = "", commit_note: str = "", note: str = "") -> str:
    """The line that names a record's source: ``- `name`: <lead>commit C<commit_note>, <hardware>; command: `...```
    followed by ``note``."""
    return (f"- `{name}`: {lead}commit {record['commit']}{commit_note}, {record['hardware']}; command: "
            f"`{record['command']}`{note}")  # fmt: skip


def record_lines(name: str, record: Record) -> List[str]:
    """The lines that name an accuracy record: commit, hardware, seed, the command to rerun it and its notes."""
    lines = [f"- `{name}`: commit {record['commit']}, {record['hardware']}, seed {record['seed']}; command:",
             f"  `{record['command']}`"]  # fmt: skip
    return lines + ([f"  Note: {record['notes']}"] if record.get("notes") else [])


def accuracy_sections(
    records: Sequence[Tuple[str, Record]],
    figure_dir: Optional[str],
    doc_dir: str,
    targets: Sequence[Record] = (),
) -> List[str]:
    """Markdown lines of every protocol's accuracy table (and figures written to ``figure_dir``); ``targets`` (see
    :func:`target_lines`) are checked under the table of their protocol and K."""
    groups = group_records(records)
    lines: List[str] = []
    for protocol in sorted({key[0] for key in groups}):
        lines += [f"## LA, `{protocol}` protocol", ""]
        if protocol != "full":
            lines += [
                "The paper Dice column is each method's own paper on the full protocol (112×112×80 patches,",
                "thousands of iterations, the standard LA test set): a reference point, not comparable with this",
                "protocol's rows.",
                "",
            ]
        for k in sorted({key[1] for key in groups if key[0] == protocol}):
            keys = sorted((key for key in groups if key[:2] == (protocol, k)), key=lambda key: (key[2], key[3]))
            lines += [
                f"### K = {k} labeled",
                "",
                "| method | seeds | Dice | failures: Dice < 50 (per seed) | Jaccard | HD95 | ASD | reference "
                "| Δ Dice vs reference [95 % CI] | wins | verdict | Δ Dice where neither fails [95 % CI] (pairs) "
                "| train time | paper Dice |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            compared = {}
            for key in keys:
                by_seed = groups[key]
                result = comparison(groups, key)
                if result is not None:
                    compared[key] = result
                wins = f"{result['wins']}/{result['cases']}" if result else "–"
                minutes = sum(r["train_seconds"] for _, r in by_seed.values()) / len(by_seed) / 60
                paper = PAPER_LA_DICE.get((key[2], k)) if not key[3] else None
                lines.append(
                    f"| {row_label(key[2], key[3])} | {', '.join(str(s) for s in sorted(by_seed))} "
                    f"| {_seed_cell(by_seed, 'dice', 100)} | {failure_cell(by_seed)} "
                    f"| {_seed_cell(by_seed, 'jaccard', 100)} "
                    f"| {_seed_cell(by_seed, 'hd95', 1)} | {_seed_cell(by_seed, 'asd', 1)} "
                    f"| {reference_cell(groups, key, result)} "
                    f"| {format_interval(result, 100) if result else '–'} "
                    f"| {wins} "
                    f"| {verdict(result) if result else '–'} | {without_failures_cell(result)} | {minutes:.0f} min "
                    f"| {'–' if paper is None else f'{paper:.2f}'} |"
                )
            lines.append("")
            lines += failure_lines([(row_label(key[2], key[3]), groups[key]) for key in keys])
            lines += target_lines(targets, protocol, k, compared)
            lines += gap_lines(groups, protocol, k, compared)
            if figure_dir and compared:
                path = write_figure(groups, keys, compared, os.path.join(figure_dir, f"la_{protocol}_k{k}.png"))
                lines += [f"![Dice per method and paired differences]({os.path.relpath(path, doc_dir)})", ""]
        lines += ["Records (commit, hardware, seed, command to rerun):", ""]
        for key in sorted(key for key in groups if key[0] == protocol):
            for seed, (name, r) in sorted(groups[key].items()):
                lines += record_lines(name, r)
        lines.append("")
    return lines


def target_lines(targets: Sequence[Record], protocol: str, k: int, compared: Dict[GroupKey, Dict[str, Any]]
                 ) -> List[str]:  # fmt: skip
    """Whether each target set for this protocol and K is met, from the paired comparisons of its methods.

    A target (``docs/results/targets.json``, kind ``targets``, list ``targets``) names ``protocol``, ``k``,
    ``methods`` (rows as the table labels them: ``ducisc`` for the default runs, ``ducisc [fp32]`` for a variant),
    ``min_delta`` (Dice points over the row's reference), ``interval_above_zero`` (the 95 % interval must exclude 0
    from above), ``source`` (who set it) and optionally ``why``: where the report shows what explains a miss, printed
    after a missed target. A row without runs is reported as not measured."""
    lines = []
    by_method = {row_label(key[2], key[3]): result for key, result in compared.items()}
    for target in targets:
        if target["protocol"] != protocol or target["k"] != k:
            continue
        for method in target["methods"]:
            result = by_method.get(method)
            goal = f"`{method}` at least {target['min_delta']:+.2f} Dice above its reference"
            goal += " with the interval above 0" if target["interval_above_zero"] else ""
            if result is None:
                lines.append(f"- Target ({target['source']}): {goal}: **not measured**.")
                continue
            met = result["mean"] * 100 >= target["min_delta"] and (
                result["low"] > 0 or not target["interval_above_zero"]
            )
            why = f" Why: {target['why']}" if not met and target.get("why") else ""
            lines.append(f"- Target ({target['source']}): {goal}: **{'met' if met else 'missed'}** "
                         f"({format_interval(result, 100)} vs `{result['reference']}`).{why}")  # fmt: skip
    return lines + [""] if lines else []


def fully_labeled(record: Record) -> bool:
    """Whether a run labeled every training case (its split reads ``first N of <list> (N labeled)``)."""
    match = re.match(r"train: first (\d+) of \S+ \((\d+) labeled\)", record.get("split", ""))
    return bool(match) and match.group(1) == match.group(2)


def _mean_dice(by_seed: Dict[int, Tuple[str, Record]]) -> float:
    return float(np.mean([r["summary"]["dice"]["mean"] for _, r in by_seed.values()])) * 100


def gap_lines(groups, protocol: str, k: int, compared: Dict[GroupKey, Dict[str, Any]]) -> List[str]:
    """For the compared rows of one K, per reference run they are paired with: the fully labeled run of that
    reference in the same variant (the upper bound of what unlabeled data can buy under the protocol) and the share of
    the gap between the K-labeled reference and it that each row closes (Δ Dice / (upper bound − reference), means
    over seeds)."""
    lines = []
    for reference_key_ in sorted({result["reference_key"] for result in compared.values()}):
        _, _, reference, variant = reference_key_
        bounds = [key for key in groups if key[0] == protocol and key[2] == reference and key[3] == variant
                  and key[1] > k and all(fully_labeled(r) for _, r in groups[key].values())]  # fmt: skip
        if not bounds:
            continue
        bound_key = max(bounds, key=lambda key: key[1])
        bound, base = _mean_dice(groups[bound_key]), _mean_dice(groups[reference_key_])
        shares = [f"{row_label(key[2], key[3])} {100 * result['mean'] * 100 / (bound - base):.0f} %"
                  for key, result in sorted(compared.items()) if result["reference_key"] == reference_key_]  # fmt: skip
        seeds = ", ".join(str(s) for s in sorted(groups[bound_key]))
        label = row_label(reference, variant)
        lines += [
            f"Upper bound: `{label}` with all {bound_key[1]} training cases labeled reaches {bound:.2f} Dice",
            f"(seeds {seeds}), {bound - base:+.2f} over `{label}` at K = {k}; share of that gap closed by the",
            f"unlabeled data (Δ Dice / gap): {'; '.join(shares)}.",
            "",
        ]
    return lines


def write_figure(groups, keys: Sequence[GroupKey], compared: Dict[GroupKey, Dict[str, Any]], path: str) -> str:
    """Two panels: each method's Dice (one dot per seed, bar = mean over seeds); each compared method's per-case
    Dice differences from its reference (one dot per test case, averaged over seeds; line = 95 % interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row_label(key[2], key[3]) for key in keys]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1]})
    for x, key in enumerate(keys):
        dice = [r["summary"]["dice"]["mean"] * 100 for _, r in groups[key].values()]
        left.bar(x, sum(dice) / len(dice), color="#9ecae1", width=0.6)
        left.scatter([x] * len(dice), dice, color="#08519c", s=14, zorder=3)
    left.set_xticks(range(len(keys)), labels, rotation=35, ha="right", fontsize=8)
    left.set_ylabel("Dice (%) over the test cases\ndot: one seed; bar: mean")
    lowest = min(r["summary"]["dice"]["mean"] * 100 for key in keys for _, r in groups[key].values())
    left.set_ylim(max(0.0, lowest - 10.0), 100.0)
    left.set_xlim(-0.6, len(keys) - 0.4)
    compared_keys = [key for key in keys if key in compared]
    for x, key in enumerate(compared_keys):
        result = compared[key]
        values = [v * 100 for v in case_means(result["differences"]).values()]
        right.scatter([x] * len(values), values, color="#636363", s=10, alpha=0.7, zorder=2)
        right.plot([x, x], [result["low"] * 100, result["high"] * 100], color="#cb181d", lw=3, zorder=3)
        right.scatter([x], [result["mean"] * 100], color="#cb181d", s=30, zorder=4)
    right.axhline(0.0, color="black", lw=0.8)
    ticks = [f"{row_label(key[2], key[3])}\n− {compared[key]['reference']}" for key in compared_keys]
    right.set_xticks(range(len(compared_keys)), ticks, rotation=35, ha="right", fontsize=8)
    right.set_xlim(-0.6, max(len(compared_keys), 3) - 0.4)
    right.set_ylabel("Δ Dice per test case (points)\nred: mean and 95 % CI")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def reference_variant(variant: str, variants: Iterable[str]) -> Optional[str]:
    """The variant a validation ``variant`` is compared with: the longest other name of ``variants`` that, followed
    by ``_``, starts it (``fp32_torch_init`` -> ``fp32``), else the default ``""`` when there is one; ``None`` for the
    default itself or when there is nothing to compare with."""
    if not variant:
        return None
    bases = [base for base in variants if base and base != variant and variant.startswith(base + "_")]
    if bases:
        return max(bases, key=len)
    return "" if "" in variants else None


def validation_sections(records: Sequence[Tuple[str, Record]]) -> List[str]:
    """Markdown lines of the validation runs (``accuracy`` records with ``"evaluation": "validation"``): per protocol,
    K, method and split, each variant against its reference (:func:`reference_variant`), paired by seed and
    validation case. These runs choose settings; the benchmark's test cases play no part in them."""
    groups: Dict[Tuple[str, int, str, str], Dict[str, Dict[int, Tuple[str, Record]]]] = {}
    for name, record in records:
        key = (record["protocol"], record["num_labeled"], record["method"], record["split"])
        groups.setdefault(key, {}).setdefault(record.get("variant", ""), {})[record["seed"]] = (name, record)
    if not groups:
        return []
    lines = [
        "## Choosing settings on a validation split",
        "",
        "Settings are chosen here, never on the test cases of the tables above: these runs train on the first",
        "training cases of `train.list` (the first K labeled) and are scored on the next ones, all within the",
        "benchmark's 60 training cases; each table names its split (e.g. `python scripts/benchmark.py accuracy ...",
        "--train_cases 48 --test_cases 12 --results_dir docs/results/validation` scores cases 48-59). Each variant",
        "is compared with its reference run, paired by seed and validation case (95 % bootstrap interval over cases",
        "within seeds): the method's default, or for a variant named `<base>_<change>` the `<base>` variant (e.g.",
        "`fp32_torch_init` against `fp32`).",
        "",
    ]
    for (protocol, k, method, split), variants in sorted(groups.items()):
        lines += [
            f"### {method}, K = {k}, `{protocol}` protocol ({split})",
            "",
            "| variant | overrides | seeds | Dice | failures: Dice < 50 (per seed) | Δ Dice vs reference [95 % CI] "
            "| wins | verdict | Δ Dice where neither fails [95 % CI] (pairs) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for variant, by_seed in sorted(variants.items()):
            overrides = by_seed[min(by_seed)][1].get("overrides") or {}
            cells = ", ".join(f"`{key} {value}`" for key, value in overrides.items()) or "– (default)"
            base = reference_variant(variant, variants)
            reference = variants.get(base) if base is not None else None
            result = None
            if reference and set(by_seed) & set(reference):
                result = paired_result(per_case(by_seed), per_case(reference))
            wins = f"{result['wins']}/{result['cases']}" if result else "–"
            name = f"{variant} (vs {base or 'default'})" if variant and base else variant or "default"
            lines.append(
                f"| {name} | {cells} | {', '.join(map(str, sorted(by_seed)))} "
                f"| {_seed_cell(by_seed, 'dice', 100)} | {failure_cell(by_seed)} "
                f"| {format_interval(result, 100) if result else '–'} "
                f"| {wins} | {verdict(result) if result else '–'} | {without_failures_cell(result)} |"
            )
        lines.append("")
        lines += failure_lines([(variant or "default", by_seed) for variant, by_seed in sorted(variants.items())])
        lines += ["Records:", ""]
        for variant, by_seed in sorted(variants.items()):
            for seed, (name, r) in sorted(by_seed.items()):
                lines += record_lines(f"validation/{name}", r)
        lines.append("")
    return lines


def probe_sections(records: Sequence[Tuple[str, Record]]) -> List[str]:
    """Markdown lines of the term probes (``term_probe`` records of ``scripts/probe_terms.py``): per record, each
    term's weight at the probed iteration, its value, the norm of its weighted gradient relative to the supervised
    one (``sup`` + ``cr``) and the cosine between them; then the pseudo-labels' Dice on unlabeled training crops."""
    if not records:
        return []
    lines = [
        "## What the unlabeled terms do: gradient probes",
        "",
        "`scripts/probe_terms.py` on a trained model's final checkpoint, on a few batches of 2 labeled + 2",
        "unlabeled training crops: per loss term, its weight at the probed iteration (ramps applied), its value,",
        "the norm of its weighted gradient relative to the supervised gradient (‖g‖ / ‖g_sup‖) and the cosine",
        "between the two; then, on the unlabeled crops, the foreground Dice of the predictions each method learns",
        "from (their labels are read for this diagnostic only). A term with a small relative norm barely moves",
        "the weights; a cosine near 0 means it pushes in a direction the labeled data do not. Both are summed in",
        "float64; records made while they were summed in fp32 (those whose `sup` row reads a cosine above 1)",
        "carry rounding of up to ~0.3 % in those two columns.",
        "",
    ]
    for name, r in records:
        lines += [
            f"### {r['method']}, K = {r.get('num_labeled', '–')}, iteration {r['iteration']} (`{name}`)",
            "",
            "| term | weight | value | ‖g‖ / ‖g_sup‖ | cosine with g_sup |",
            "|---|---|---|---|---|",
        ]
        for term, row in r["terms"].items():
            lines.append(f"| {term} | {row['weight']:.3g} | {row['value']:.4f} | {row['norm']:.3f} "
                         f"| {row['cosine']:.3f} |")  # fmt: skip
        dice = {key[len("dice_"):]: value for key, value in r["unlabeled_pseudo_labels"].items()
                if key.startswith("dice_")}  # fmt: skip
        lines += [
            "",
            "Pseudo-label Dice on the unlabeled crops: "
            + ", ".join(f"{source} {value:.3f}" for source, value in dice.items())
            + f" (foreground truth {r['unlabeled_pseudo_labels']['fg_truth']:.3f} of the voxels).",
            "",
            f"Commit {r['commit']}, {r['hardware']}; command: `{r['command']}`",
            "",
        ]
    return lines
