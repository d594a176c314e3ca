"""Statistics of the benchmark report: seed summaries and paired per-case comparisons with bootstrap intervals.

A method is run with several seeds and scored on the same test cases. A comparison with its reference pairs each
case with itself and each seed with the same seed (same labeled set, same initialisation draw, same test case), so
the difference of a case is the mean over the common seeds of ``score_method(seed, case) - score_reference(seed,
case)``. The interval resamples cases with replacement *within* each seed (the cases are the unit that varies; the
seeds are kept), which is the "bootstrap over cases within seeds" of the issue tracker's statistics rule.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import numpy as np

#: scores per seed and case: ``{seed: {case: value}}``.
Scores = Mapping[int, Mapping[str, float]]


def seed_summary(per_seed: Sequence[float]) -> Dict[str, float]:
    """``mean`` and sample ``sd`` (``ddof=1``; 0 for one seed) over the seeds' scores (each a mean over the test
    cases), and the number of seeds ``n``."""
    if not per_seed:
        raise ValueError("no seeds to summarise.")
    sd = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0
    return {"mean": float(np.mean(per_seed)), "sd": sd, "n": len(per_seed)}


def paired_differences(method: Scores, reference: Scores) -> Dict[int, Dict[str, float]]:
    """``{seed: {case: method - reference}}`` over the seeds both have and, per seed, the cases both have.

    Raises ``ValueError`` when no seed or no case is shared.
    """
    seeds = sorted(set(method) & set(reference))
    if not seeds:
        raise ValueError(f"no common seed: method {sorted(method)}, reference {sorted(reference)}.")
    differences = {}
    for seed in seeds:
        cases = sorted(set(method[seed]) & set(reference[seed]))
        if not cases:
            raise ValueError(f"seed {seed}: no common test case.")
        differences[seed] = {case: method[seed][case] - reference[seed][case] for case in cases}
    return differences


def failed_cases(scores: Scores, threshold: float) -> Dict[int, List[str]]:
    """``{seed: [case, ...]}``: per seed, the cases whose score is below ``threshold`` (a failed segmentation)."""
    return {
        seed: sorted(case for case, value in values.items() if value < threshold) for seed, values in scores.items()
    }


def paired_differences_without_failures(
    method: Scores, reference: Scores, threshold: float
) -> Dict[int, Dict[str, float]]:
    """:func:`paired_differences` restricted to the (seed, case) pairs on which neither run fails (both scores
    ``>= threshold``); a seed left with no such case is dropped.

    Raises ``ValueError`` when no seed is shared or every shared pair has a failure.
    """
    differences = paired_differences(method, reference)
    kept = {
        seed: {case: value for case, value in values.items()
               if method[seed][case] >= threshold and reference[seed][case] >= threshold}
        for seed, values in differences.items()
    }  # fmt: skip
    kept = {seed: values for seed, values in kept.items() if values}
    if not kept:
        raise ValueError(f"every paired case fails (score < {threshold}) in the method or its reference.")
    return kept


def bootstrap_interval(
    differences: Mapping[int, Mapping[str, float]],
    confidence: float = 0.95,
    resamples: int = 10000,
    rng_seed: int = 0,
) -> Dict[str, float]:
    """Mean paired difference and its percentile bootstrap interval, cases resampled within each seed.

    The statistic is the mean over seeds of the mean over that seed's cases. Each resample draws, independently per
    seed, as many cases as the seed has, with replacement. Returns ``mean``, ``low``, ``high``, the per-case
    means' ``wins`` (cases whose difference averaged over seeds is > 0), ``losses`` (< 0) and ``cases``.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    rng = np.random.default_rng(rng_seed)
    per_seed = [np.array([values[c] for c in sorted(values)], dtype=float) for values in differences.values()]
    statistic = float(np.mean([d.mean() for d in per_seed]))
    draws = np.zeros(resamples)
    for d in per_seed:
        draws += d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    draws /= len(per_seed)
    tail = (1.0 - confidence) / 2.0
    per_case = case_means(differences)
    return {
        "mean": statistic,
        "low": float(np.quantile(draws, tail)),
        "high": float(np.quantile(draws, 1.0 - tail)),
        "wins": sum(v > 0 for v in per_case.values()),
        "losses": sum(v < 0 for v in per_case.values()),
        "cases": len(per_case),
    }


def case_means(differences: Mapping[int, Mapping[str, float]]) -> Dict[str, float]:
    """Each case's difference averaged over the seeds that scored it."""
    collected: Dict[str, List[float]] = {}
    for values in differences.values():
        for case, value in values.items():
            collected.setdefault(case, []).append(value)
    return {case: float(np.mean(values)) for case, values in sorted(collected.items())}


def format_interval(result: Mapping[str, float], scale: float = 1.0, digits: int = 2) -> str:
    """``"+1.23 [0.45, 2.01]"`` from :func:`bootstrap_interval`'s ``mean``, ``low`` and ``high``."""
    mean, low, high = (result[k] * scale for k in ("mean", "low", "high"))
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def excludes_zero(result: Mapping[str, float]) -> bool:
    """Whether the interval lies entirely above or entirely below 0."""
    return result["low"] > 0 or result["high"] < 0
