"""Lay ``/path/to/BraTS_demo`` out as an nnU-Net v2 raw dataset (symbolic links, nothing copied).

    python scripts/brats_demo_layout.py /path/to/BraTS_demo /tmp/Dataset100_BraTSDemo [--num_test 3]

``<CASE>/FLAIR.nii.gz`` becomes ``imagesTr/<CASE>_0000.nii.gz`` and ``<CASE>/GT_W.nii.gz`` ``labelsTr/<CASE>.nii.gz``
(whole tumour); the last ``num_test`` cases (sorted by name) go to ``imagesTs/`` (unlabeled for training) with their
labels in ``labelsTs/`` (for scoring the masks, not read by training). ``dataset.json`` names the channel and the
labels. Then train, segment and score with the README's own-data commands.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root, so that `bundle` imports

from bundle.config.errors import BundleError, cli  # noqa: E402


def main(source: str, target: str, num_test: int = 3) -> None:
    """Write the layout of ``source`` at ``target``; see the module docstring."""
    cases = sorted(p.name for p in Path(source).iterdir() if (p / "FLAIR.nii.gz").is_file())
    if len(cases) <= num_test:
        raise BundleError("Cannot lay out the dataset:", [f"{source}: {len(cases)} case(s), num_test={num_test}"])
    root = Path(target)
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    train, test = cases[:-num_test], cases[-num_test:]
    for case in cases:
        split = "Tr" if case in train else "Ts"
        links = {f"images{split}/{case}_0000.nii.gz": "FLAIR.nii.gz", f"labels{split}/{case}.nii.gz": "GT_W.nii.gz"}
        for name, file in links.items():
            if not (root / name).exists():
                os.symlink(os.path.abspath(os.path.join(source, case, file)), root / name)
    spec = {
        "channel_names": {"0": "FLAIR"},
        "labels": {"background": 0, "whole tumour": 1},
        "numTraining": len(train),
        "file_ending": ".nii.gz",
        "name": "BraTSDemo",
    }
    (root / "dataset.json").write_text(json.dumps(spec, indent=4) + "\n")
    print(f"{root}: {len(train)} training cases, {len(test)} in imagesTs/ ({', '.join(test)})")


if __name__ == "__main__":
    with cli():
        fire.Fire(main)
