"""Which sliding-window grid should inference use? The papers' dense grid against fewer windows, measured.

* :func:`window_grid` (``python scripts/benchmark.py window_grid --record docs/results/<accuracy record>.json``)
  scores one accuracy run's final model on its test cases once per grid of :data:`GRIDS` (``configs/evaluate.json``
  with ``--validate#inferer#overlap`` / ``--validate#inferer#mode``; the same preprocessing, inversion and metrics as
  the accuracy record) and times one volume of the test cases' median size per grid (:func:`time_grid`).
* :func:`window_grid_sections` is the section of ``docs/RESULTS.md``: per grid, the Dice difference to the papers'
  grid paired per case (models as strata of the bootstrap) and the time per volume relative to it.

The papers' grid (``sw_strides`` of the protocol: 18x18x4 for 112x112x80 windows, 9x9x2 for 64x64x32) overlaps
each voxel about 20 times along z; MONAI's ``SlidingWindowInferer`` with an overlap fraction and Gaussian blending
(``mode="gaussian"``) is the common alternative.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer

from benchmarking.runs import (
    CONFIG_DIR,
    bundle_command,
    parse_bundle,
    read_metrics,
    rescored_header,
    rescoring_settings,
    run_isolated,
    run_logged,
    write_json,
)
from benchmarking.statistics import bootstrap_interval, format_interval
from bundle.data.datalists import la_items, read_case_list, volume_shape
from bundle.engine.precision import AutocastInference
from bundle.inference.folder import strides_to_overlap
from bundle.inference.optimization import optimize_for_inference

Record = Dict[str, Any]

#: grid name -> ``overlap`` (``None``: the protocol's ``sw_strides``, the papers' grid) and blending ``mode``.
GRIDS: Dict[str, Dict[str, Any]] = {
    "papers": {"overlap": None, "mode": "constant"},
    "overlap 0.75, gaussian": {"overlap": 0.75, "mode": "gaussian"},
    "overlap 0.5, constant": {"overlap": 0.5, "mode": "constant"},
    "overlap 0.5, gaussian": {"overlap": 0.5, "mode": "gaussian"},
    "overlap 0.25, constant": {"overlap": 0.25, "mode": "constant"},
    "overlap 0.25, gaussian": {"overlap": 0.25, "mode": "gaussian"},
}
#: the acceptance rule of a grid: mean Dice within this of the papers' grid (points) ...
DICE_TOLERANCE = 0.1
#: ... with the paired interval inside +- this (points).
INTERVAL_BOUND = 0.3


def time_grid(
    config_files: Sequence[str], overrides: Dict[str, Any], volume: Sequence[int], overlap: Any, mode: str
) -> Dict[str, float]:
    """Seconds to segment one random volume of shape ``volume`` with the configured network (inference rewrite of
    ``configs/inference.json``, ``validate#precision``) through ``SlidingWindowInferer`` with ``overlap`` (a float
    or one per axis) and blending ``mode``, after one warm-up window; and the number of windows. Run it with
    :func:`benchmarking.runs.run_isolated`."""
    parser = parse_bundle(config_files, overrides)
    network = parser.get_parsed_content("network_def").eval()
    optimize_for_inference(network)
    predictor = AutocastInference(network, parser.get_parsed_content("validate#precision"), torch.device("cpu"))
    patch = list(parser["patch_size"])
    windows = [0]

    def counted(batch: torch.Tensor) -> torch.Tensor:
        windows[0] += batch.shape[0]
        return predictor(batch)

    inferer = SlidingWindowInferer(roi_size=patch, sw_batch_size=4, overlap=overlap, mode=mode)
    image = torch.randn(
        1, parser.get_parsed_content("in_channels"), *volume, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        predictor(image[..., : patch[0], : patch[1], : patch[2]])  # warm-up: one-off allocations and kernels
        start = time.perf_counter()
        inferer(image, counted)
    return {"seconds_per_volume": time.perf_counter() - start, "windows": windows[0]}


def median_test_shape(dataset_dir: str, test_list: str, resample_factor: float) -> List[int]:
    """The median (per axis) shape of the test cases' images after the protocol's zoom (``resample_factor``)."""
    shapes = [volume_shape(item["image"]) for item in la_items(dataset_dir, read_case_list(test_list))]
    return [int(round(float(np.median([s[axis] for s in shapes])) * resample_factor)) for axis in range(3)]


def window_grid(record: str, results_dir: str = "docs/results", grids: Optional[Sequence[str]] = None) -> str:
    """Score the final model of the accuracy record ``record`` on its test cases under each grid of :data:`GRIDS`
    (or the names in ``grids``; ``papers`` always first) and time one median-sized test volume per grid. Needs the
    run's folder (``runs/benchmark/<name>/``: model and split lists) on this machine. Writes
    ``<results_dir>/window_grid_<record name>.json`` after each grid; returns its path. Grids already in that file
    are kept, not measured again (their timing came from the same machine kind: the file's ``hardware``)."""
    names = ["papers"] + [name for name in (grids or GRIDS) if name != "papers"]
    unknown = [name for name in names if name not in GRIDS]
    if unknown:
        raise ValueError(f"unknown grid(s) {unknown}; choose from {list(GRIDS)}.")
    source, configs, overrides, run_dir = rescoring_settings(record)
    test_list, dataset_dir = overrides["datalists#val_list"], source["config"]["dataset_dir"]
    parser = parse_bundle(configs, overrides)
    patch, strides = list(parser["patch_size"]), list(parser["sw_strides"])
    volume = median_test_shape(dataset_dir, test_list, float(parser["resample_factor"]))
    output = os.path.join(results_dir, f"window_grid_{os.path.splitext(os.path.basename(record))[0]}.json")
    results: Dict[str, Record] = {}
    if os.path.isfile(output):
        with open(output) as handle:
            results = json.load(handle)["grids"]
    for name in [n for n in names if n not in results]:
        grid = GRIDS[name]
        overlap = strides_to_overlap(patch, strides) if grid["overlap"] is None else grid["overlap"]
        out = os.path.join(run_dir, "window_grid", name.replace(", ", "_").replace(" ", "_"))
        os.makedirs(out, exist_ok=True)
        settings = {**overrides, "output_dir": out, "figure_slices": 0, "validate#inferer#mode": grid["mode"]}
        if grid["overlap"] is not None:
            settings["validate#inferer#overlap"] = grid["overlap"]
        command = bundle_command("run", configs + [f"{CONFIG_DIR}/evaluate.json"], settings)
        seconds = run_logged(command, os.path.join(out, "evaluate.log"))
        metrics = read_metrics(out)
        timing = run_isolated("time_grid", module="benchmarking.window_grid", config_files=configs,
                              overrides=overrides, volume=volume, overlap=overlap, mode=grid["mode"])  # fmt: skip
        results[name] = {
            "overlap": overlap,
            "mode": grid["mode"],
            "evaluation_seconds": seconds,
            "seconds_per_volume": timing["seconds_per_volume"],
            "windows": timing["windows"],
            "summary": metrics["summary"],
            "dice": {row["case"]: row["dice"] for row in metrics["per_case"]},
        }
        command = f"python scripts/benchmark.py window_grid --record {os.path.relpath(record)}"
        result = {
            **rescored_header("window_grid", record, source, command),
            "patch_size": patch,
            "sw_strides": strides,
            "timed_volume": volume,
            "grids": results,
        }
        write_json(result, results_dir, os.path.splitext(os.path.basename(output))[0])  # after each grid
    return output


def grid_comparison(records: Sequence[Record], grid: str) -> Tuple[Dict[str, float], float]:
    """The Dice difference ``grid - papers`` (points, 0-100) paired per case, each record (model) a stratum of the
    bootstrap (:func:`~benchmarking.statistics.bootstrap_interval`), and the mean time per volume of ``grid``
    relative to the papers' grid."""
    differences = {
        index: {
            case: 100 * (r["grids"][grid]["dice"][case] - dice) for case, dice in r["grids"]["papers"]["dice"].items()
        }
        for index, r in enumerate(records)
    }
    ratio = float(np.mean([r["grids"][grid]["seconds_per_volume"] / r["grids"]["papers"]["seconds_per_volume"]
                           for r in records]))  # fmt: skip
    return bootstrap_interval(differences), ratio


def windows(records: Sequence[Record], grid: str) -> str:
    """The windows of the timed volume under ``grid`` (one number when every record agrees, else the range)."""
    counts = sorted({r["grids"][grid]["windows"] for r in records})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def acceptable(result: Dict[str, float]) -> bool:
    """The rule for a default grid: mean within :data:`DICE_TOLERANCE` of the papers' grid, interval inside
    +- :data:`INTERVAL_BOUND`."""
    return (
        abs(result["mean"]) <= DICE_TOLERANCE and -INTERVAL_BOUND <= result["low"] and result["high"] <= INTERVAL_BOUND
    )


def window_grid_sections(records: Sequence[Tuple[str, Record]]) -> List[str]:
    """The "Window grid" section of ``docs/RESULTS.md`` (empty without records)."""
    if not records:
        return []
    models = [r for _, r in records]
    lines = [
        "## Window grid",
        "",
        "The same trained models segment their 20 test cases with the papers' window grid (the protocol's",
        "`sw_strides`) and with fewer windows (MONAI `SlidingWindowInferer` overlap, constant or Gaussian blending),",
        "through `configs/evaluate.json` (same preprocessing, inversion and metrics as the accuracy records). Δ Dice",
        "is grid − papers' grid per case (points), each model a stratum of the bootstrap; time is one volume of the",
        "test cases' median size (its window count beside it), relative to the papers' grid on the same machine",
        "(timed beside other jobs: the window count is the steadier measure of cost). A grid is",
        f"acceptable as the default when |Δ| ≤ {DICE_TOLERANCE} and the interval lies inside ±{INTERVAL_BOUND}.",
        "Models: " + ", ".join(f"`{os.path.basename(r['record'])}`" for r in models) + ".",
        "Commands: "
        + "; ".join(sorted({f"`{r['command']}`" for r in models}))
        + " (commit(s) "
        + ", ".join(sorted({r["commit"] for r in models}))
        + f"; {models[0]['hardware']}).",
        "",
        "| grid | overlap | windows per volume | Δ Dice vs papers' grid | wins / losses | time per volume "
        "| acceptable |",
        "|---|---|---|---|---|---|---|",
    ]
    papers_seconds = np.mean([r["grids"]["papers"]["seconds_per_volume"] for r in models])
    papers_overlap = [round(o, 3) for o in models[0]["grids"]["papers"]["overlap"]]
    lines.append(f"| papers' (`sw_strides` {models[0]['sw_strides']}) | {papers_overlap} | {windows(models, 'papers')} "
                 f"| – | – | {papers_seconds:.1f} s (1.00×) | – |")  # fmt: skip
    for grid in [g for g in GRIDS if g != "papers" and all(g in r["grids"] for r in models)]:
        result, ratio = grid_comparison(models, grid)
        lines.append(
            f"| {grid} | {GRIDS[grid]['overlap']} | {windows(models, grid)} | {format_interval(result)} "
            f"| {result['wins']} / {result['losses']} "
            f"| {ratio:.2f}× | {'yes' if acceptable(result) else 'no'} |"
        )
    return lines + [""]
