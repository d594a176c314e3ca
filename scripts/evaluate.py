"""Compare a folder of predicted masks with a folder of labels (files paired by name).

    python scripts/evaluate.py PRED_DIR LABEL_DIR --output_dir OUT [--image_dir IMAGES] [--classes "[1,2]"]
        [--num_slices 3]

Writes ``OUT/metrics.csv`` (``case, dice, jaccard, hd95, asd, hd95_mm, asd_mm``), ``OUT/summary.json`` and
``OUT/figures/<case>.png``, and prints the summary (mean ± std). HD95/ASD follow medpy (the papers' numbers), in
voxels and in mm. See :func:`bundle.evaluation.evaluate_folders`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root, so that `bundle` imports

from bundle.errors import cli  # noqa: E402
from bundle.evaluation import evaluate_folders, format_summary  # noqa: E402


def main(pred_dir: str, label_dir: str, output_dir: str, **options: Any) -> None:
    """Evaluate ``pred_dir`` against ``label_dir``; ``options``: ``image_dir``, ``classes``, ``num_slices`` of
    :func:`bundle.evaluation.evaluate_folders`; see the module docstring."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    summary = evaluate_folders(pred_dir, label_dir, output_dir, **options)
    print(f"{summary['num_cases']} cases, {len(summary['empty_predictions'])} empty predictions -> {output_dir}")
    print(format_summary(summary["metrics"]))


if __name__ == "__main__":
    with cli():
        fire.Fire(main)
