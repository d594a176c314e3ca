"""The window-grid benchmark: paired comparison with the papers' grid, the acceptance rule, the report section and
the timing probe's window count."""

import pytest

from benchmarking.window_grid import acceptable, grid_comparison, time_grid, window_grid_sections
from tests.conftest import REPO_ROOT


def _record(papers, gaussian, seconds=(10.0, 2.0), index=0):
    return {
        "record": f"docs/results/la_cpu_x_k8_seed{index}.json",
        "command": f"python scripts/benchmark.py window_grid --record docs/results/la_cpu_x_k8_seed{index}.json",
        "commit": "abc1234",
        "hardware": "a CPU",
        "sw_strides": [9, 9, 2],
        "grids": {
            "papers": {
                "overlap": [0.859, 0.859, 0.938],
                "dice": papers,
                "seconds_per_volume": seconds[0],
                "windows": 70,
            },
            "overlap 0.5, gaussian": {"overlap": 0.5, "dice": gaussian, "seconds_per_volume": seconds[1], "windows": 8},
        },
    }


def test_grid_comparison_pairs_cases_within_each_model():
    first = _record({"a": 0.80, "b": 0.90}, {"a": 0.81, "b": 0.90}, seconds=(10.0, 2.0))
    second = _record({"a": 0.70, "b": 0.60}, {"a": 0.70, "b": 0.58}, seconds=(8.0, 4.0), index=1)
    result, ratio = grid_comparison([first, second], "overlap 0.5, gaussian")
    # model means in points: (+1 + 0) / 2 = +0.5 and (0 - 2) / 2 = -1.0; their mean -0.25
    assert result["mean"] == pytest.approx(-0.25)
    assert result["low"] <= -0.25 <= result["high"]
    assert (result["wins"], result["losses"], result["cases"]) == (1, 1, 2)  # a: +0.5 on average, b: -1.0
    assert ratio == pytest.approx((2.0 / 10.0 + 4.0 / 8.0) / 2)


@pytest.mark.parametrize(
    "result, expected",
    [
        ({"mean": 0.05, "low": -0.2, "high": 0.29}, True),
        ({"mean": -0.1, "low": -0.3, "high": 0.1}, True),
        ({"mean": 0.11, "low": 0.0, "high": 0.2}, False),  # mean too far
        ({"mean": 0.0, "low": -0.31, "high": 0.2}, False),  # interval too wide
    ],
)
def test_acceptance_rule(result, expected):
    assert acceptable(result) is expected


def test_section_lists_each_grid_with_its_verdict():
    same = {f"c{i}": 0.8 + 0.001 * i for i in range(20)}
    lines = window_grid_sections([("r", _record(same, dict(same)))])
    assert lines[0] == "## Window grid"
    row = next(line for line in lines if line.startswith("| overlap 0.5, gaussian"))
    assert "| 8 | +0.00 [+0.00, +0.00]" in row and "| 0.20× | yes |" in row
    assert next(line for line in lines if line.startswith("| papers'")).count("| 70 |") == 1
    assert window_grid_sections([]) == []


def test_time_grid_counts_monai_windows():
    """A 24x18x16 volume with 16^3 windows: overlap 0.5 (interval 8) gives 2 x 2 x 1 windows, 0.75 (interval 4)
    3 x 2 x 1 (MONAI: ceil((size - roi) / interval) + 1 per axis)."""
    configs = [str(REPO_ROOT / "configs" / "train.json")]
    overrides = {"base_width": 2, "patch_size": [16, 16, 16], "validate#precision": "fp32"}
    for overlap, mode, windows in ((0.5, "gaussian", 4), ([0.75, 0.75, 0.75], "constant", 6)):
        result = time_grid(configs, overrides, [24, 18, 16], overlap, mode)
        assert result["windows"] == windows and result["seconds_per_volume"] > 0
