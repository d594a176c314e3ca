"""Check a dataset as training would, without training (like nnU-Net's dataset integrity check).

    python scripts/check_data.py DATASET_DIR [--out_channels 2] [--in_channels 1] [--train_list train.list]
        [--val_list val.list]

Reads every header (exists, readable, 3D, label shape = image shape), then every volume to the last byte: finite
voxels, labels integer and in ``[0, out_channels)``, label affine equal to the image's. Every problem is listed,
one line per file and problem, and the exit status is 1; a clean dataset prints the number of items checked and
exits 0. The layouts are those of ``configs/train.json`` (LA ``train.list``, ``dataset.json``, ``imagesTr/``); all
labeled items are checked, whatever ``num_labeled`` training will use. See :func:`bundle.data.checks.check_dataset`.
"""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root, so that `bundle` imports

from bundle.config.errors import cli  # noqa: E402
from bundle.data.checks import check_dataset  # noqa: E402


@functools.wraps(check_dataset)  # its signature and options, for fire's --help
def main(*args, **options) -> None:
    """Check a dataset (:func:`bundle.data.checks.check_dataset`) and print how many items passed."""
    dataset_dir = inspect.signature(check_dataset).bind(*args, **options).arguments["dataset_dir"]
    print(f"{dataset_dir}: {check_dataset(*args, **options)} items checked, no problem found.")


if __name__ == "__main__":
    with cli():
        fire.Fire(main)
