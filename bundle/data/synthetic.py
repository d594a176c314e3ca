"""The embedded default dataset: small synthetic 3D volumes, generated deterministically on first run.

Each volume holds a bright ellipsoid (the target, label 1) and a dimmer sphere (a distractor, label 0) on smooth
noise, so a segmenter must learn shape and contrast rather than a threshold. The dataset is an MSD-style folder
(``dataset.json``, ``imagesTr/``, ``labelsTr/``) that :func:`bundle.data.datalists.build_datalists` reads like user data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Tuple

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter


def synthetic_volume(rng: np.random.Generator, shape: Tuple[int, int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """One (image, label) pair of the given spatial shape: float32 image, uint8 label in {0, 1}."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    size = np.asarray(shape, dtype=np.float32)
    centre = rng.uniform(0.35, 0.65, 3) * size
    radii = rng.uniform(0.12, 0.22, 3) * size
    label = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1.0
    distractor_centre = np.where(centre < size / 2, size * 0.8, size * 0.2)
    distractor = ((grid - distractor_centre[:, None, None, None]) ** 2).sum(0) <= (0.1 * size.min()) ** 2
    background = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=2.0) * 3.0
    image = background + 1.6 * label + 0.8 * distractor + 0.3 * rng.standard_normal(shape).astype(np.float32)
    return image.astype(np.float32), label.astype(np.uint8)


def _save(array: np.ndarray, path: str, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, affine), path)


def synthetic_labeled_count(root: str) -> int:
    """The number of labeled training items of the dataset at ``root``; -1 when there is no ``dataset.json``, and a
    large number when it is not a synthetic dataset (user data is never rewritten)."""
    path = os.path.join(root, "dataset.json")
    if not os.path.isfile(path):
        return -1
    with open(path) as handle:
        spec = json.load(handle)
    if spec.get("name") != "synthetic":
        return 2**31
    return sum("label" in item for item in spec.get("training", []))


def ensure_synthetic_dataset(
    root: str,
    num_labeled: int = 8,
    num_unlabeled: int = 24,
    num_validation: int = 4,
    shape: Tuple[int, int, int] = (64, 64, 48),
    seed: int = 20241124,
) -> str:
    """Create the synthetic dataset at ``root`` unless ``root/dataset.json`` already exists with at least
    ``num_labeled`` labeled training items; return ``root``.

    Volume ``i`` is the same whatever the split (one seeded generator, drawn in order): a request for more labeled
    items (``train.json`` passes ``max(8, num_labeled)``) rewrites the dataset with the labels of the first
    ``num_labeled`` volumes, the next ``num_unlabeled`` unlabeled and the last ``num_validation`` for validation.
    Written into a temporary folder beside ``root`` and renamed, so an interrupted run never leaves a half-made
    dataset. Same arguments, same bytes.
    """
    if synthetic_labeled_count(root) >= num_labeled:
        return root
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "imagesTr"))
        os.makedirs(os.path.join(tmp, "labelsTr"))
        rng = np.random.default_rng(seed)
        affine = np.diag([1.0, 1.0, 1.5, 1.0])
        spec = {"name": "synthetic", "description": "bright ellipsoid vs dim sphere", "training": [], "validation": []}
        total = num_labeled + num_unlabeled + num_validation
        for index in range(total):
            image, label = synthetic_volume(rng, shape)
            name = f"case_{index:03d}.nii.gz"
            _save(image, os.path.join(tmp, "imagesTr", name), affine)
            entry = {"image": f"imagesTr/{name}"}
            if index < num_labeled or index >= num_labeled + num_unlabeled:
                _save(label, os.path.join(tmp, "labelsTr", name), affine)
                entry["label"] = f"labelsTr/{name}"
            spec["validation" if index >= num_labeled + num_unlabeled else "training"].append(entry)
        with open(os.path.join(tmp, "dataset.json"), "w") as handle:
            json.dump(spec, handle, indent=4)
        if os.path.isdir(root):
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return root


def nnunet_volume(
    rng: np.random.Generator, shape: Tuple[int, int, int], num_channels: int = 2
) -> Tuple[np.ndarray, np.ndarray]:
    """One multi-class case: channels ``(C, *shape)`` float32 and a label with classes 0 (background), 1 (the
    ellipsoid of :func:`synthetic_volume`) and 2 (its distractor sphere, here a class of its own). Channel ``c`` shows
    the classes with its own contrast (channel 1 inverts class 2), so both channels carry information."""
    image, target = synthetic_volume(rng, shape)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    size = np.asarray(shape, dtype=np.float32)
    centre = np.asarray(np.argwhere(target).mean(0)) if target.any() else size / 2
    second = np.where(centre < size / 2, size * 0.75, size * 0.25)
    sphere = (((grid - second[:, None, None, None]) / (0.15 * size[:, None, None, None])) ** 2).sum(0) <= 1.0
    label = np.where(target > 0, 1, np.where(sphere, 2, 0)).astype(np.uint8)
    channels = [image + 1.2 * (label == 2)]
    for index in range(1, num_channels):
        channels.append((-1.0) ** index * 1.5 * (label == 2) + 0.8 * (label == 1) + 0.3 * rng.standard_normal(shape))
    return np.stack(channels).astype(np.float32), label


def make_nnunet_dataset(
    root: str,
    num_training: int = 6,
    num_test: int = 3,
    shape: Tuple[int, int, int] = (40, 40, 12),
    spacing: Tuple[float, float, float] = (0.7, 0.7, 5.0),
    num_channels: int = 2,
    seed: int = 7,
    test_labels: bool = False,
) -> str:
    """Write an nnU-Net v2 raw dataset at ``root``: ``imagesTr/case_XXX_000c.nii.gz`` (``num_channels`` channels),
    ``labelsTr/case_XXX.nii.gz`` (3 classes), ``imagesTs/`` (``num_test`` unlabeled cases) and ``dataset.json``,
    with voxel ``spacing`` (mm) and a non-trivial origin; with ``test_labels``, the ``imagesTs`` cases' labels in
    ``labelsTs/`` (not part of the nnU-Net layout: for scoring inference). For tests and the README's own-data
    example."""
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-12.0, 7.5, 30.0]
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    for index in range(num_training + num_test):
        image, label = nnunet_volume(rng, shape, num_channels)
        case, folder = f"case_{index:03d}", "imagesTr" if index < num_training else "imagesTs"
        for channel in range(num_channels):
            _save(image[channel], os.path.join(root, folder, f"{case}_{channel:04d}.nii.gz"), affine)
        if index < num_training or test_labels:
            labels = "labelsTr" if index < num_training else "labelsTs"
            os.makedirs(os.path.join(root, labels), exist_ok=True)
            _save(label, os.path.join(root, labels, f"{case}.nii.gz"), affine)
    spec = {
        "channel_names": {str(c): f"mod{c}" for c in range(num_channels)},
        "labels": {"background": 0, "ellipsoid": 1, "sphere": 2},
        "numTraining": num_training,
        "file_ending": ".nii.gz",
        "name": "synthetic_nnunet",
    }
    with open(os.path.join(root, "dataset.json"), "w") as handle:
        json.dump(spec, handle, indent=4)
    return root
