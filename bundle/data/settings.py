"""Voxel spacing and intensity normalisation of a dataset, resolved from its labeled training images.

``configs/train.json`` has two settings, resolved here before any volume is preprocessed:

* ``spacing``: ``"median"`` (default): the median voxel size, per RAS axis, of the labeled training images (read
  from their headers, as nnU-Net's target spacing); ``[x, y, z]`` in mm; or ``null``: the native grid. Datasets
  without a voxel size (LA ``.h5``) always keep their native grid.
* ``intensity``: ``"zscore"`` (default, MRI): each volume's channels z-scored on their own; ``"ct"``: each channel
  clipped to the 0.5 and 99.5 percentiles of the labeled foreground voxels of all training images, then z-scored with
  the mean and standard deviation of those voxels (nnU-Net's CT normalisation), the same numbers for every volume.

The resolved values (``{"spacing": [x, y, z] | None, "intensity": {"scheme": ..., statistics}}``) go into the
preprocessing (:func:`bundle.data.transforms.preprocessing`) and into the model's settings file
(:mod:`bundle.inference.model_settings`), so inference uses the same numbers.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.transforms import EnsureChannelFirstd

from bundle.config.errors import BundleError
from bundle.data.datalists import image_files
from bundle.data.transforms import LoadVolumed

#: foreground voxels sampled per image and channel for the CT statistics (nnU-Net samples 10,000 per case).
FOREGROUND_SAMPLES = 10000
#: percentiles that bound the CT intensities.
CT_PERCENTILES = (0.5, 99.5)
INTENSITY_SCHEMES = ("zscore", "ct")


def ras_spacing(path: str) -> Optional[List[float]]:
    """Voxel size (mm) along the R, A, S axes after reorientation to RAS (MONAI's ``Orientationd``), from the header;
    ``None`` for files without a voxel size (``.h5``)."""
    if path.endswith(".h5"):
        return None
    try:
        affine = nib.load(path).affine
    except Exception as err:  # nibabel raises several exception types for bad files
        raise BundleError("Data check failed:", [f"{path}: not a readable image ({err})."]) from err
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    axes = nib.orientations.io_orientation(affine)[:, 0].astype(int)
    spacing = [0.0, 0.0, 0.0]
    for voxel_axis, ras_axis in enumerate(axes):
        spacing[ras_axis] = float(sizes[voxel_axis])
    return spacing


def median_spacing(items: Sequence[Dict[str, Any]]) -> Optional[List[float]]:
    """The per-axis median of :func:`ras_spacing` over the items' (first channel) images; ``None`` when any image
    has no voxel size."""
    spacings = [ras_spacing(image_files(item["image"])[0]) for item in items]
    if not spacings or any(s is None for s in spacings):
        return None
    return [round(float(v), 6) for v in np.median(np.asarray(spacings), axis=0)]


def foreground_statistics(items: Sequence[Dict[str, Any]], seed: int = 0) -> Dict[str, Any]:
    """The CT statistics of the labeled items, per channel: ``lower`` / ``upper`` (0.5 / 99.5 percentiles), ``mean``
    and ``std`` of the foreground voxels (label > 0), at most :data:`FOREGROUND_SAMPLES` drawn per image."""
    rng = np.random.default_rng(seed)
    load = LoadVolumed(keys=["image", "label"])
    channel_first = EnsureChannelFirstd(keys=["image", "label"])
    samples: List[List[np.ndarray]] = []
    for item in items:
        data = channel_first(load(dict(item)))
        image = torch.as_tensor(data["image"]).numpy()
        foreground = torch.as_tensor(data["label"]).numpy()[0] > 0
        for channel, values in enumerate(image):
            voxels = values[foreground]
            if voxels.size > FOREGROUND_SAMPLES:
                voxels = rng.choice(voxels, FOREGROUND_SAMPLES, replace=False)
            while len(samples) <= channel:
                samples.append([])
            samples[channel].append(voxels)
    pooled = [np.concatenate(parts) for parts in samples]
    if not pooled or any(p.size == 0 for p in pooled):
        raise BundleError("Data check failed:", ["intensity 'ct': the labeled images have no foreground voxels."])
    return {
        "scheme": "ct",
        "lower": [float(np.percentile(p, CT_PERCENTILES[0])) for p in pooled],
        "upper": [float(np.percentile(p, CT_PERCENTILES[1])) for p in pooled],
        "mean": [float(p.mean()) for p in pooled],
        "std": [float(max(p.std(), 1e-8)) for p in pooled],
    }


def check_spacing(spacing: Any) -> None:
    """``"median"``, ``None`` or three positive numbers; else a :class:`BundleError` naming the setting."""
    ok = spacing is None or spacing == "median"
    if isinstance(spacing, (list, tuple)) and len(spacing) == 3:
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in spacing)
    if not ok:
        raise BundleError(
            "Invalid settings (config or command-line overrides):",
            [f'spacing: expected "median", null or [x, y, z] in mm, got {spacing!r}'],
        )


def resolve_data_settings(
    items: Sequence[Dict[str, Any]], spacing: Any = "median", intensity: str = "zscore"
) -> Dict[str, Any]:
    """The resolved ``spacing`` and ``intensity`` (module docstring) of a dataset whose labeled items are ``items``.

    Returns:
        ``{"spacing": [x, y, z] or None, "intensity": {"scheme": "zscore"} or the CT statistics}``.
    """
    check_spacing(spacing)
    if intensity not in INTENSITY_SCHEMES:
        raise BundleError(
            "Invalid settings (config or command-line overrides):",
            [f"intensity: expected one of {list(INTENSITY_SCHEMES)}, got {intensity!r}"],
        )
    if spacing == "median":
        spacing = median_spacing(items)
    statistics = foreground_statistics(items) if intensity == "ct" else {"scheme": "zscore"}
    return {"spacing": None if spacing is None else [float(v) for v in spacing], "intensity": statistics}
