"""Compare a folder of predicted masks with a folder of labels (files paired by name).

    python scripts/evaluate.py PRED_DIR LABEL_DIR --output_dir OUT [--image_dir IMAGES] [--classes "[1,2]"]
        [--num_slices 3] [--allow_unpaired true]

Writes ``OUT/metrics.csv`` (``case, dice, jaccard, hd95, asd, hd95_mm, asd_mm``), ``OUT/summary.json`` and
``OUT/figures/<case>.png``, and prints the summary (mean ± std). HD95/ASD follow medpy (the papers' numbers), in
voxels and in mm. A prediction without a label or a label without a prediction stops the command (exit status 1,
the unpaired cases listed) unless ``--allow_unpaired true``; so does an ``OUT`` that is one of the input folders.
See :func:`bundle.inference.evaluation.evaluate_folders`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root, so that `bundle` imports

from bundle.config.booleans import boolean_command  # noqa: E402
from bundle.config.errors import cli  # noqa: E402
from bundle.inference.evaluation import score_mask_folders  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    with cli():
        fire.Fire(boolean_command(score_mask_folders))
