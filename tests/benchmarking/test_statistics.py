"""The report's statistics on hand-made numbers: seed summaries, paired differences, bootstrap intervals."""

import numpy as np
import pytest

from benchmarking import statistics


def test_seed_summary_is_the_mean_and_sample_sd_over_seeds():
    assert statistics.seed_summary([0.80, 0.84, 0.82]) == pytest.approx({"mean": 0.82, "sd": 0.02, "n": 3})
    assert statistics.seed_summary([0.7]) == {"mean": 0.7, "sd": 0.0, "n": 1}
    with pytest.raises(ValueError):
        statistics.seed_summary([])


def test_paired_differences_pair_the_same_seed_and_case_only():
    method = {1: {"a": 0.9, "b": 0.8, "c": 0.5}, 2: {"a": 0.7, "b": 0.6}, 3: {"a": 1.0}}
    reference = {1: {"a": 0.8, "b": 0.8}, 2: {"a": 0.6, "b": 0.9}}
    assert statistics.paired_differences(method, reference) == {
        1: pytest.approx({"a": 0.1, "b": 0.0}),
        2: pytest.approx({"a": 0.1, "b": -0.3}),
    }
    with pytest.raises(ValueError, match="no common seed"):
        statistics.paired_differences({1: {"a": 1.0}}, {2: {"a": 1.0}})
    with pytest.raises(ValueError, match="no common test case"):
        statistics.paired_differences({1: {"a": 1.0}}, {1: {"b": 1.0}})


def test_a_constant_difference_has_a_degenerate_interval_at_its_value():
    differences = {seed: {f"c{i}": 0.03 for i in range(20)} for seed in (1, 2, 3)}
    result = statistics.bootstrap_interval(differences, resamples=500)
    assert result["mean"] == pytest.approx(0.03)
    assert result["low"] == pytest.approx(0.03) and result["high"] == pytest.approx(0.03)
    assert (result["wins"], result["losses"], result["cases"]) == (20, 0, 20)
    assert statistics.excludes_zero(result) and statistics.format_interval(result, 100) == "+3.00 [+3.00, +3.00]"


def test_the_interval_matches_an_independent_resampling_of_cases_within_seeds():
    rng = np.random.default_rng(5)
    values = {seed: rng.normal(0.01 * seed, 0.05, size=20) for seed in (1, 2)}
    differences = {seed: {f"c{i:02d}": float(v) for i, v in enumerate(vals)} for seed, vals in values.items()}
    result = statistics.bootstrap_interval(differences, resamples=4000, rng_seed=11)
    # independent: the statistic is the mean of the two seeds' means; its sampling sd is
    # sqrt(var_1 / n + var_2 / n) / 2, so the 95 % interval is close to mean -/+ 1.96 sd
    mean = (values[1].mean() + values[2].mean()) / 2
    sd = np.sqrt(values[1].var() / 20 + values[2].var() / 20) / 2
    assert result["mean"] == pytest.approx(mean)
    assert result["low"] == pytest.approx(mean - 1.96 * sd, abs=0.25 * sd)
    assert result["high"] == pytest.approx(mean + 1.96 * sd, abs=0.25 * sd)
    assert statistics.bootstrap_interval(differences, resamples=4000, rng_seed=11) == result  # seeded: reproducible


def test_wins_count_cases_by_their_seed_averaged_difference():
    differences = {1: {"a": 0.2, "b": -0.1, "c": 0.0}, 2: {"a": -0.1, "b": -0.1, "c": 0.0}}
    assert statistics.case_means(differences) == pytest.approx({"a": 0.05, "b": -0.1, "c": 0.0})
    result = statistics.bootstrap_interval(differences, resamples=100)
    assert (result["wins"], result["losses"], result["cases"]) == (1, 1, 3)
    assert not statistics.excludes_zero({"low": -0.01, "high": 0.02}) and statistics.excludes_zero(
        {"low": -0.03, "high": -0.01}
    )
    with pytest.raises(ValueError, match="confidence"):
        statistics.bootstrap_interval(differences, confidence=1.0)
