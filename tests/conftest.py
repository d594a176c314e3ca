"""Shared test settings: where the optional real data lives, and small torch thread counts for 2-core machines."""

from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
LA_DIR = SHARED_DIR / "data" / "LA"
BRATS_DIR = SHARED_DIR / "data" / "BraTS_demo"

torch.set_num_threads(2)
