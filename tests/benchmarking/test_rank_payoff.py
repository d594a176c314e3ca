"""The ranking payoff experiment without training: explicit labeled sets in the split, draws, and the report."""

import json
import os

import pytest

from benchmarking.rank_payoff import payoff, payoff_sections, random_draw
from benchmarking.results_page import report
from benchmarking.runs import accuracy, split_lists, write_json


def test_labeled_cases_come_first_and_the_default_split_is_unchanged(tmp_path):
    cases = [f"case{i:02d}" for i in range(10)]
    (tmp_path / "train.list").write_text("\n".join(cases) + "\n")
    default = split_lists(str(tmp_path), "train.list", 7, str(tmp_path / "default"))
    assert open(default["train"]).read().split() == cases[:7]
    paths = split_lists(str(tmp_path), "train.list", 7, str(tmp_path / "run"), ["case05", "case01"])
    assert open(paths["train"]).read().split() == ["case05", "case01", "case00", "case02", "case03", "case04", "case06"]
    assert open(paths["test"]).read().split() == cases[7:]
    with pytest.raises(ValueError, match=r"not training cases: \['case08'\]"):
        split_lists(str(tmp_path), "train.list", 7, str(tmp_path / "bad"), ["case01", "case08"])
    with pytest.raises(ValueError, match="distinct"):
        split_lists(str(tmp_path), "train.list", 7, str(tmp_path / "bad"), ["case01", "case01"])


def test_explicit_labeled_cases_need_a_variant_and_k_cases(tmp_path):
    with pytest.raises(ValueError, match="--variant"):
        accuracy(str(tmp_path), num_labeled=2, labeled_cases=["a", "b"])
    with pytest.raises(ValueError, match="num_labeled=8"):
        accuracy(str(tmp_path), variant="x", labeled_cases=["a", "b"])
    with pytest.raises(ValueError, match="list of case names"):
        accuracy(str(tmp_path), num_labeled=2, variant="x", labeled_cases="[1D7CUD,06SR5R]")
    with pytest.raises(ValueError, match="--tag"):
        payoff(str(tmp_path), max_iterations=2)
    assert list(tmp_path.iterdir()) == []  # refused before any split or run folder is written


def test_random_draws_are_distinct_reproducible_and_differ_between_draws():
    pool = [f"p{i}" for i in range(56)]
    first = random_draw(pool, 4, 1337, 0)
    assert first == random_draw(pool, 4, 1337, 0) and len(set(first)) == 4 and set(first) <= set(pool)
    assert first != random_draw(pool, 4, 1337, 1) and first != random_draw(pool, 4, 7, 0)


def _arm(results, name, dice_by_case):
    record = {
        "kind": "accuracy",
        "commit": "abc1234",
        "per_case": [{"case": c, "dice": d} for c, d in dice_by_case.items()],
    }
    return os.path.relpath(write_json(record, str(results / "rank_payoff"), name))


def test_report_pairs_each_arm_by_seed_and_case(tmp_path, monkeypatch):
    """Every case: ranked = base + 12 points, random draws + 6, 8, 10 (mean + 8), first + 10; the intervals collapse on
    these differences."""
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    cases = [f"c{i:02d}" for i in range(20)]
    for seed in (1, 2):
        base = {c: 0.70 + i / 1000 for i, c in enumerate(cases)}
        arms = {
            "base": _arm(results, f"base{seed}", base),
            "first": _arm(results, f"first{seed}", {c: v + 0.10 for c, v in base.items()}),
            "ranked": _arm(results, f"ranked{seed}", {c: v + 0.12 for c, v in base.items()}),
        }
        for draw, shift in enumerate((0.06, 0.08, 0.10)):
            arms[f"random_draw{draw}"] = _arm(results, f"r{seed}{draw}", {c: v + shift for c, v in base.items()})
        ranking = {
            "command": "python -m monai.bundle run ...",
            "rows": [
                {"scan": s, "ranked_by": "disagreement", "disagreement": str(0.5 - i / 10)}
                for i, s in enumerate("wxyz")
            ],
        }
        manifest = {"kind": "rank_payoff", "protocol": "cpu", "method": "dual_journal", "seed": seed, "base_k": 4,
                    "add": 4, "tag": "", "arms": arms, "ranking": ranking, "random_draws": [["a"]] * 3}  # fmt: skip
        write_json(manifest, str(results), f"rank_payoff_cpu_dual_journal_seed{seed}")
    text = open(report(str(results), str(tmp_path / "RESULTS.md"), str(tmp_path / "figures"))).read()
    assert "## Which scans to label next: LA, `cpu` protocol, dual_journal, K = 4 → 8" in text
    assert "| base (K₀ labeled) | 1, 2 | 70.95 ± 0.00 |" in text
    assert "| + random, draw 0 | 1, 2 | 76.95 ± 0.00 |" in text
    assert "| + top-ranked | 1, 2 | 82.95 ± 0.00 | 0/40 (0, 0) |" in text
    assert "| + random | 1, 2 | 78.95 ± 0.00 | 0/120 (0, 0) |" in text  # failures over the 3 draws of 2 seeds
    assert "| + top-ranked − + random | +4.00 [+4.00, +4.00] | 20/20 | above |" in text
    assert "**Answer:** uncertainty-chosen scans beat random ones (Δ Dice +4.00 [+4.00, +4.00])." in text
    assert "| + random − + next of the list | -2.00 [-2.00, -2.00] | 0/20 | below |" in text
    assert "| + top-ranked − base (K₀ labeled) | +12.00 [+12.00, +12.00] | 20/20 | above |" in text
    assert "- seed 1: top-ranked w (disagreement 0.5000), x (disagreement 0.4000)" in text
    assert "  - ranked: `results/rank_payoff/ranked1.json` (commit abc1234)" in text
    assert "planned draws so far" not in text and "(not trained yet)" not in text
    assert payoff_sections([]) == []
    # one draw of seed 2 not trained yet: the answer and the list say so, the random arm averages the others
    manifest = json.load(open(results / "rank_payoff_cpu_dual_journal_seed2.json"))
    del manifest["arms"]["random_draw2"]
    first_seed = json.load(open(results / "rank_payoff_cpu_dual_journal_seed1.json"))
    text = "\n".join(payoff_sections([("a", first_seed), ("b", manifest)]))
    assert "The random arm has 5 of its 6 planned draws so far." in text
    assert "  - random draw 2: a (not trained yet)" in text


def test_arms_split_between_processes_share_one_manifest(tmp_path, monkeypatch):
    """``--arms random`` and ``--arms '["ranked","first"]'`` run disjoint trainings and both land in the manifest."""
    import benchmarking.rank_payoff as rank_payoff

    cases = [f"case{i:02d}" for i in range(14)]
    (tmp_path / "train.list").write_text("\n".join(cases) + "\n")
    trained = []

    def fake_accuracy(num_labeled, seed, results_dir, variant, labeled_cases, **_):
        trained.append((variant, labeled_cases))
        record = {"kind": "accuracy", "config": {"model_dir": str(tmp_path / "runs" / variant / "models")}}
        return write_json(record, results_dir, f"la_cpu_dual_journal_{variant}_k{num_labeled}_seed{seed}")

    ranking = {"rows": [{"scan": c} for c in reversed(cases[4:10])]}
    monkeypatch.setattr(rank_payoff, "accuracy", fake_accuracy)
    monkeypatch.setattr(rank_payoff, "rank_pool", lambda *args: ranking)
    common = dict(dataset_dir=str(tmp_path), train_cases=10, random_draws=2, results_dir=str(tmp_path / "results"),
                  runs_dir=str(tmp_path / "runs"), tag="smoke", max_iterations=2)  # fmt: skip
    [manifest_path] = rank_payoff.payoff(**common, arms="random")
    assert [variant for variant, _ in trained] == ["smoke_random4_draw0", "smoke_random4_draw1"]
    rank_payoff.payoff(**common, arms=["ranked", "first"])
    assert [variant for variant, _ in trained[2:]] == ["smoke", "smoke_rank_top4", "smoke"]
    assert trained[3][1] == cases[:4] + ["case09", "case08", "case07", "case06"]  # base cases + the top 4
    manifest = json.load(open(manifest_path))
    assert sorted(manifest["arms"]) == ["base", "first", "random_draw0", "random_draw1", "ranked"]
    assert manifest["ranking"] == ranking and len(manifest["random_draws"]) == 2
    with pytest.raises(ValueError, match="choose among"):
        rank_payoff.payoff(**common, arms="everything")
    with pytest.raises(ValueError, match="draws \\[2\\]: choose among 0..1"):
        rank_payoff.payoff(**common, arms="random", draws=[2])


def test_draws_are_shared_between_processes_and_the_standard_base_run_is_reused(tmp_path, monkeypatch):
    import benchmarking.rank_payoff as rank_payoff

    cases = [f"case{i:02d}" for i in range(14)]
    (tmp_path / "train.list").write_text("\n".join(cases) + "\n")
    trained = []

    def fake_accuracy(num_labeled, seed, results_dir, variant, labeled_cases, **_):
        trained.append(variant)
        record = {"kind": "accuracy", "config": {"model_dir": "m"}}
        return write_json(record, results_dir, f"la_cpu_dual_journal_{variant}_k{num_labeled}_seed{seed}")

    monkeypatch.setattr(rank_payoff, "accuracy", fake_accuracy)
    monkeypatch.setattr(rank_payoff, "rank_pool", lambda *args: {"rows": [{"scan": c} for c in cases[4:10]]})
    results = tmp_path / "results"
    write_json({"kind": "accuracy", "config": {"model_dir": "m"}}, str(results), "la_cpu_dual_journal_k4_seed1337")
    common = dict(dataset_dir=str(tmp_path), train_cases=10, random_draws=3, results_dir=str(results),
                  runs_dir=str(tmp_path / "runs"))  # fmt: skip
    [manifest_path] = rank_payoff.payoff(**common, arms="random", draws=[2])
    rank_payoff.payoff(**common, arms="random", draws=[0, 1])
    assert trained == ["random4_draw2", "random4_draw0", "random4_draw1"]
    rank_payoff.payoff(**common, arms="ranked")
    assert trained[3:] == ["rank_top4"]  # the standard K = 4 run is the base: not trained again
    manifest = json.load(open(manifest_path))
    assert manifest["arms"]["base"] == os.path.relpath(results / "la_cpu_dual_journal_k4_seed1337.json")
    assert sorted(manifest["arms"]) == ["base", "random_draw0", "random_draw1", "random_draw2", "ranked"]
