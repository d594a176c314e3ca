"""Does ranking pay? Uncertainty-chosen scans against random ones on LA (``scripts/rank_payoff.py``).

Per seed, with the benchmark's accuracy runner (:func:`benchmarking.runs.accuracy`: same protocol, same split, the
same 20 held-out test cases):

1. ``base``: train at K = ``base_k`` (the first ``base_k`` training cases labeled), i.e. the standard K = ``base_k``
   run (its record in ``results_dir`` is reused when present, with its model in ``runs_dir``);
2. rank the unlabeled pool (training cases ``base_k`` .. ``train_cases``) with the base model and
   ``configs/rank.json`` (most uncertain first);
3. ``ranked``: retrain at K = ``base_k + add`` with the base cases plus the top ``add`` of the ranking;
4. ``random``: the same with ``add`` pool cases drawn uniformly without replacement, ``random_draws`` times (draw
   ``d`` of seed ``s`` uses ``numpy.random.default_rng([s, d])``);
5. ``first``: the base cases plus the next ``add`` of the list, i.e. the standard K = ``base_k + add`` run (its
   record in ``results_dir`` is reused when present).

Every run writes its accuracy record the moment it finishes (``results_dir/rank_payoff/``, the standard ``first``
record in ``results_dir``), and a manifest ``results_dir/rank_payoff_<protocol>_<method>[_<tag>]_seed<seed>.json``
(kind ``rank_payoff``: the ranking, the drawn cases and every arm's record path) is rewritten after each step, so
an interrupted experiment continues where it stopped. :func:`payoff_sections` turns the manifests into the section
of ``docs/RESULTS.md``: per-case Dice differences paired by seed and test case, with the bootstrap intervals of
:mod:`benchmarking.statistics`.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from benchmarking.report import failure_count, verdict
from benchmarking.runs import (
    CONFIG_DIR,
    accuracy,
    bundle_command,
    display_command,
    git_commit,
    method_configs,
    parse_bundle,
    run_logged,
    write_json,
)
from benchmarking.statistics import bootstrap_interval, format_interval, paired_differences, seed_summary
from bundle.data.datalists import read_case_list

Record = Dict[str, Any]
#: inference settings the ranking takes from the training configuration of the base run.
MODEL_KEYS = ("in_channels", "out_channels", "base_width", "patch_size", "sw_strides", "resample_factor")
#: the arms, in report order, and how the report names them.
ARMS = {"base": "base (K₀ labeled)", "first": "+ next of the list", "random": "+ random", "ranked": "+ top-ranked"}
#: what ``--arms`` chooses from: ``ranked`` (the base run, its ranking and the top-ranked arm), ``first``, ``random``.
ARM_GROUPS = ("ranked", "first", "random")
#: the paired comparisons of the report: (arm, reference arm).
COMPARISONS = (("ranked", "random"), ("ranked", "first"), ("random", "first"), ("ranked", "base"))


def network_norm(method_config: Dict[str, Any]) -> str:
    """The normalisation of the networks in a method's config (``batch``, the networks' default, unless set)."""
    norms = {net.get("norm", "batch") for net in method_config.values() if isinstance(net, dict) and "_target_" in net}
    if len(norms) != 1:
        raise ValueError(f"the method's networks use different normalisations {sorted(norms)}; rank needs one.")
    return norms.pop()


#: config files that rank with a trained model (its ``model_metadata.json`` rebuilds its network).
RANK_CONFIGS = [f"{CONFIG_DIR}/inference.json", f"{CONFIG_DIR}/rank.json"]


def random_draw(pool: Sequence[str], count: int, seed: int, draw: int) -> List[str]:
    """``count`` distinct cases of ``pool``, uniformly, reproducibly from ``(seed, draw)``."""
    rng = np.random.default_rng([seed, draw])
    return [pool[i] for i in sorted(rng.choice(len(pool), size=count, replace=False))]


def _variant(tag: str, arm: str) -> str:
    return "_".join(part for part in (tag, arm) if part)


def _load(path: str) -> Record:
    with open(path) as handle:
        return json.load(handle)


def payoff(
    dataset_dir: str,
    method: str = "dual_journal",
    protocol: str = "cpu",
    seeds: Sequence[int] = (1337,),
    base_k: int = 4,
    add: int = 4,
    random_draws: int = 3,
    list_file: str = "train.list",
    train_cases: int = 60,
    results_dir: str = "docs/results",
    runs_dir: str = "runs/benchmark",
    tag: str = "",
    rank_by: str = "auto",
    arms: Sequence[str] = ("ranked", "first", "random"),
    draws: Optional[Sequence[int]] = None,
    **overrides: Any,
) -> List[str]:
    """Run the experiment of the module docstring for every seed; return the manifests' paths.

    ``overrides`` are passed to every training and evaluation (e.g. a tiny smoke configuration); they need a
    ``tag``, which goes into every run's name and the manifest's, so that they never mix with the real runs.
    ``arms`` are the arms this process runs (:data:`ARM_GROUPS`; ``ranked`` includes the base run and the
    ranking): two processes, e.g. ``--arms '["ranked","first"]'`` and ``--arms random``, share one seed's work
    and its manifest, each on its own core. ``draws`` (indices below ``random_draws``) are the random draws this
    process trains (all by default), so that two processes can share the draws, e.g. ``--draws "[0,1]"``.
    """
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    arms = [arms] if isinstance(arms, str) else list(arms)
    if not arms or set(arms) - set(ARM_GROUPS):
        raise ValueError(f"arms {arms}: choose among {list(ARM_GROUPS)}.")
    if overrides and not tag:
        raise ValueError(f"overrides {sorted(overrides)} change the protocol: name the experiment with --tag.")
    if random_draws < 1 or add < 1 or base_k < 1:
        raise ValueError(f"base_k, add and random_draws must be >= 1 (got {base_k}, {add}, {random_draws}).")
    draws = list(range(random_draws)) if draws is None else [draws] if isinstance(draws, int) else list(draws)
    if not draws or not set(draws) <= set(range(random_draws)):
        raise ValueError(f"draws {draws}: choose among 0..{random_draws - 1}.")
    cases = read_case_list(list_file if os.path.isabs(list_file) else os.path.join(dataset_dir, list_file))
    pool = cases[base_k:train_cases]
    if len(pool) < add:
        raise ValueError(f"{list_file}: {len(pool)} unlabeled training cases, fewer than add={add}.")
    arm_dir = os.path.join(results_dir, "rank_payoff")
    common = dict(dataset_dir=dataset_dir, method=method, protocol=protocol, list_file=list_file,
                  train_cases=train_cases, runs_dir=runs_dir, **overrides)  # fmt: skip
    labeled_base = cases[:base_k]
    manifests = []
    for seed in seeds:
        name = f"rank_payoff_{protocol}_{method}{'_' + tag if tag else ''}_seed{seed}"
        manifest_path = os.path.join(results_dir, f"{name}.json")
        header = dict(kind="rank_payoff", method=method, protocol=protocol, seed=seed, base_k=base_k, add=add,
                      tag=tag, overrides=overrides, pool=pool)  # fmt: skip

        def update(**fields: Any) -> Record:
            return update_manifest(manifest_path, os.path.join(runs_dir, f"{name}.lock"), header, **fields)

        def run_arm(arm: str, labeled: Optional[List[str]], k: int, variant: str, where: str) -> str:
            """The arm's record: reused when it exists, else trained, evaluated and written now."""
            record_name = f"la_{protocol}_{method}{'_' + variant if variant else ''}_k{k}_seed{seed}"
            path = os.path.join(where, f"{record_name}.json")
            if not os.path.isfile(path):
                path = accuracy(**common, num_labeled=k, seed=seed, results_dir=where, variant=variant,
                                labeled_cases=labeled, notes=f"rank payoff: {arm} arm")  # fmt: skip
            update(arms={arm: os.path.relpath(path)})
            return path

        update()
        standard_where = results_dir if not tag else arm_dir  # where the standard runs' records are
        if "ranked" in arms:
            base = _load(run_arm("base", None, base_k, tag, standard_where))
            ranking = rank_pool(base, dataset_dir, pool, method, protocol, rank_by, overrides)
            update(ranking=ranking)
            top = [row["scan"] for row in ranking["rows"][:add]]
            run_arm("ranked", labeled_base + top, base_k + add, _variant(tag, f"rank_top{add}"), arm_dir)
        if "first" in arms:
            run_arm("first", None, base_k + add, tag, standard_where)
        if "random" in arms:
            chosen_by_draw = [random_draw(pool, add, seed, d) for d in range(random_draws)]
            update(random_draws=chosen_by_draw)
            for draw in draws:
                chosen = chosen_by_draw[draw]
                variant = _variant(tag, f"random{add}_draw{draw}")
                run_arm(f"random_draw{draw}", labeled_base + chosen, base_k + add, variant, arm_dir)
        manifests.append(os.path.relpath(manifest_path))
    return manifests


def update_manifest(path: str, lock_path: str, header: Record, arms: Optional[Dict[str, str]] = None, **fields: Any
                    ) -> Record:  # fmt: skip
    """Read, update and rewrite the manifest at ``path`` under an exclusive lock on ``lock_path``: processes that
    run different arms of one seed at the same time (``--arms``) never lose each other's entries. ``header`` and
    ``fields`` replace keys; ``arms`` entries are added to the manifest's ``arms``."""
    os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = _load(path) if os.path.isfile(path) else {}
        manifest.update(header, **fields)
        manifest["arms"] = {**manifest.get("arms", {}), **(arms or {})}
        write_json(manifest, os.path.dirname(path) or ".", os.path.splitext(os.path.basename(path))[0])
    return manifest


def rank_pool(
    base: Record,
    dataset_dir: str,
    pool: Sequence[str],
    method: str,
    protocol: str,
    rank_by: str,
    overrides: Dict[str, Any],
) -> Record:
    """Rank ``pool`` with the base run's final model (``configs/rank.json`` in a subprocess, the inference settings
    of its training configuration); reuses a finished ranking. Returns ``command`` and the ranked ``rows``."""
    run_dir = os.path.dirname(base["config"]["model_dir"])
    rank_dir = os.path.join(run_dir, "rank")
    os.makedirs(rank_dir, exist_ok=True)
    pool_list = os.path.join(rank_dir, "pool.list")
    with open(pool_list, "w") as handle:
        handle.write("\n".join(pool) + "\n")
    training = parse_bundle(method_configs(method, protocol), overrides)
    settings = {key: training[key] for key in MODEL_KEYS}
    settings["norm"] = network_norm(training["method"])
    settings.update(dataset_dir=os.path.relpath(dataset_dir), case_list=pool_list, output_dir=rank_dir,
                    ckpt_path=os.path.join(base["config"]["model_dir"], "model.pt"), rank_by=rank_by)  # fmt: skip
    command = bundle_command("run", RANK_CONFIGS, settings)
    csv_path = os.path.join(rank_dir, "ranking.csv")
    if not os.path.isfile(csv_path):
        run_logged(command, os.path.join(rank_dir, "rank.log"))
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    if sorted(row["scan"] for row in rows) != sorted(pool):
        raise RuntimeError(f"{csv_path}: ranks {len(rows)} scans, the pool has {len(pool)}; see rank.log.")
    return {"command": display_command(command), "commit": git_commit(), "csv": os.path.relpath(csv_path),
            "rows": rows}  # fmt: skip


# -------------------------------------------------------------------------------------------------- report
def arm_scores(manifest: Record) -> Dict[str, Dict[str, float]]:
    """``{arm: {case: Dice}}`` of one manifest (one seed), each random draw as ``random_draw<d>``, plus ``random``:
    the per-case mean over the draws (their common cases), the expected Dice of adding random scans. Arms not run
    yet are absent."""
    scores = {}
    for arm, path in manifest.get("arms", {}).items():
        if os.path.isfile(path):
            scores[arm] = {row["case"]: row["dice"] for row in _load(path)["per_case"]}
    draws = [dice for arm, dice in scores.items() if arm.startswith("random_draw")]
    if draws:
        common = sorted(set.intersection(*(set(d) for d in draws)))
        scores["random"] = {case: float(np.mean([d[case] for d in draws])) for case in common}
    return scores


def payoff_sections(manifests: Sequence[Tuple[str, Record]]) -> List[str]:
    """Markdown lines of the ranking-payoff section of ``docs/RESULTS.md``, one table per experiment (protocol,
    method, K₀, added, tag), seeds pooled as in :mod:`benchmarking.statistics`."""
    experiments: Dict[tuple, List[Record]] = {}
    for _, manifest in manifests:
        key = (manifest["protocol"], manifest["method"], manifest["base_k"], manifest["add"], manifest["tag"])
        experiments.setdefault(key, []).append(manifest)
    lines: List[str] = []
    for (protocol, method, base_k, add, tag), group in sorted(experiments.items()):
        by_seed = {m["seed"]: arm_scores(m) for m in sorted(group, key=lambda m: m["seed"])}
        title = f"## Which scans to label next: LA, `{protocol}` protocol, {method}, K = {base_k} → {base_k + add}"
        lines += [
            title + (f" [{tag}]" if tag else ""),
            "",
            f"From K₀ = {base_k} labeled cases, {add} more are labeled: the top {add} of the base model's ranking",
            "(`configs/rank.json`: most uncertain first), the next cases of the list (the standard run), or cases",
            "drawn at random from the same unlabeled pool (`random`: the per-case mean over the draws). Same seeds,",
            "protocol and held-out test cases; Δ Dice is the per-case difference paired by seed and test case with a",
            "95 % bootstrap interval over test cases within seeds (`benchmarking/statistics.py`). Failures: test",
            "cases with Dice < 50, summed over seeds (and over the draws for `random`).",
            "",
            "| arm | seeds | Dice (mean ± sd over seeds) | failures: Dice < 50 (per seed) |",
            "|---|---|---|---|",
        ]
        draws = sorted({arm for scores in by_seed.values() for arm in scores if arm.startswith("random_draw")})
        labels = {**ARMS, **{arm: f"+ random, draw {arm[len('random_draw'):]}" for arm in draws}}
        for arm in ["base", "first", *draws, "random", "ranked"]:
            seeds = [s for s, scores in by_seed.items() if arm in scores]
            if seeds:
                summary = seed_summary([float(np.mean(list(by_seed[s][arm].values()))) * 100 for s in seeds])
                cell = f"{summary['mean']:.2f} ± {summary['sd']:.2f}"
                pooled = draws if arm == "random" else [arm]  # the random arm's failures are its draws'
                scored = {s: {f"{a}/{case}": dice for a in pooled for case, dice in by_seed[s].get(a, {}).items()}
                          for s in seeds}  # fmt: skip
                lines.append(f"| {labels[arm]} | {', '.join(map(str, seeds))} | {cell} | {failure_count(scored)} |")
        lines += ["", "| comparison | Δ Dice [95 % CI] | wins | verdict |", "|---|---|---|---|"]
        answer = "not measured yet: the top-ranked or the random arm has no record."
        for arm, reference in COMPARISONS:
            pairs = {s: scores for s, scores in by_seed.items() if arm in scores and reference in scores}
            if not pairs:
                continue
            differences = paired_differences(
                {s: scores[arm] for s, scores in pairs.items()}, {s: scores[reference] for s, scores in pairs.items()}
            )
            result = bootstrap_interval(differences)
            interval, wins = format_interval(result, 100), f"{result['wins']}/{result['cases']}"
            lines.append(f"| {ARMS[arm]} − {ARMS[reference]} | {interval} | {wins} | {verdict(result)} |")
            if (arm, reference) == ("ranked", "random"):
                outcome = {"above": "beat", "below": "do worse than", "not separable": "are not separable from"}
                answer = f"uncertainty-chosen scans {outcome[verdict(result)]} random ones (Δ Dice {interval})."
        planned = sum(len(m.get("random_draws", [])) for m in group)
        measured = sum(arm.startswith("random_draw") for scores in by_seed.values() for arm in scores)
        if measured < planned:
            answer += f" The random arm has {measured} of its {planned} planned draws so far."
        lines += ["", f"**Answer:** {answer}", "", "Chosen cases and records:", ""]
        for manifest in sorted(group, key=lambda m: m["seed"]):
            ranking = manifest.get("ranking", {})
            top = ", ".join(f"{r['scan']} ({r['ranked_by']} {float(r[r['ranked_by']]):.4f})"
                            for r in ranking.get("rows", [])[:add])  # fmt: skip
            lines.append(f"- seed {manifest['seed']}: top-ranked {top or '–'}; ranking command: "
                         f"`{ranking.get('command', '–')}`")  # fmt: skip
            for draw, chosen in enumerate(manifest.get("random_draws", [])):
                missing = "" if f"random_draw{draw}" in manifest.get("arms", {}) else " (not trained yet)"
                lines.append(f"  - random draw {draw}: {', '.join(chosen)}{missing}")
            for arm, path in sorted(manifest.get("arms", {}).items()):
                commit = _load(path)["commit"] if os.path.isfile(path) else "not found"
                lines.append(f"  - {arm}: `{path}` (commit {commit})")
        lines.append("")
    return lines
