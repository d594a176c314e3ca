"""Shared test settings: where the optional real data lives, and small torch thread counts for 2-core machines."""

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import pytest
import torch

from bundle.config.errors import BundleError, find_bundle_error
from bundle.data.synthetic import ensure_synthetic_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
LA_DIR = SHARED_DIR / "data" / "LA"
BRATS_DIR = SHARED_DIR / "data" / "BraTS_demo"

torch.set_num_threads(2)


@contextmanager
def raises_bundle_error(match: Optional[str] = None) -> Iterator[List[BundleError]]:
    """Expect a :class:`BundleError`, raised directly or as the cause of MONAI's ``RuntimeError`` (config components);
    the yielded list receives it. ``match``: a regular expression searched in its report."""
    caught: List[BundleError] = []
    with pytest.raises(Exception) as info:
        yield caught
    error = find_bundle_error(info.value)
    assert error is not None, f"expected a BundleError, got {info.value!r}"
    if match is not None:
        assert re.search(match, str(error)), f"{match!r} not in {str(error)!r}"
    caught.append(error)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "tiny"
    return ensure_synthetic_dataset(str(root), num_labeled=4, num_unlabeled=4, num_validation=1, shape=(20, 20, 18))
