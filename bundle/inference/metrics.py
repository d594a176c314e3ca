"""Segmentation metrics with the semantics of ``medpy.metric.binary`` 0.5.2, as the papers report them.

Dice, Jaccard, HD95 and ASD of one binary mask pair, in voxels (``spacing=None``, the papers' unit) or in mm; beside
them sensitivity and precision, which tell under-segmentation (low sensitivity) from over-segmentation (low
precision) where Dice alone cannot.

* **Surfaces** are ``mask XOR binary_erosion(mask)`` with the connectivity-1 structuring element; voxels outside the
  array count as background. MONAI's :func:`monai.metrics.utils.get_mask_edges` (``spacing=None``) computes exactly
  this (on a crop of the union's bounding box with a 1-voxel margin, which changes nothing), so it is used as is.
* **Directed surface distances** (pred -> gt): the Euclidean distance from each pred surface voxel to the nearest
  gt surface voxel. Written here with scipy's ``distance_transform_edt`` in float64, as medpy does, because MONAI's
  ``get_surface_distance`` returns float32, which would miss medpy's values by more than 1e-6.
* **HD95** = the 95th percentile (linear interpolation) of the *pooled* directed distances, pred -> gt and
  gt -> pred concatenated. Hand-written: MONAI's ``compute_hausdorff_distance(percentile=95)`` takes the maximum of
  the two directed 95th percentiles instead, which is larger in general.
* **ASD** = the mean of the *directed* pred -> gt distances (medpy ``asd``). Hand-written: MONAI's
  ``compute_average_surface_distance`` is the same only with ``symmetric=False``, and averages over the
  directed set in float32; medpy's ``assd`` (symmetric) is *not* what the papers report.
* **Dice / Jaccard** are MONAI's ``compute_dice`` / ``compute_iou`` (``ignore_empty=False``), which equal medpy's
  ``dc`` / ``jc``. When both masks are empty they give 1.0, as medpy's ``jc`` does (medpy 0.5.2's ``dc`` gives
  ``nan`` there); :func:`binary_metrics` never reaches that case (empty prediction, below).

Empty masks, handled by :func:`binary_metrics` (the per-case numbers of the papers' test scripts):

* empty prediction (whatever the ground truth): ``(dice, jaccard, hd95, asd) = (0, 0, 0, 0)``. This is the papers'
  convention (their test scripts skip medpy and record zeros). It penalises Dice/Jaccard but *flatters* HD95/ASD,
  which is why the count of empty predictions is reported with every summary;
* non-empty prediction, empty ground truth: Dice = Jaccard = 0; HD95 and ASD are undefined (no reference surface)
  and are ``nan``, left out of the means (medpy raises ``RuntimeError`` here).
* sensitivity ``|P∩G| / |G|`` is ``nan`` when the ground truth is empty, precision ``|P∩G| / |P|`` when the
  prediction is (no zero convention: they are not papers' columns, and ``nan`` is left out of the means).

Multi-class label maps are scored per foreground class (:func:`case_metrics` with ``classes``), or as one binary
"any foreground" mask (``classes=None``, the papers' binary tasks: LA, pancreas, BraTS whole tumour).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou
from monai.metrics.utils import get_mask_edges
from scipy.ndimage import distance_transform_edt

#: distance metrics; they also get an ``_mm`` variant when the spacing is known.
DISTANCE_METRICS = ("hd95", "asd")


def _as_bool(mask: np.ndarray) -> np.ndarray:
    return np.asarray(mask).astype(bool)


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}.")


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice ``2|P∩G| / (|P|+|G|)`` of two binary masks of one shape (nonzero = foreground); 1.0 if both are empty
    (medpy ``dc`` otherwise)."""
    pred, gt = _as_bool(pred), _as_bool(gt)
    _check_pair(pred, gt)
    value = compute_dice(torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None], ignore_empty=False)
    return float(value)


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """Jaccard ``|P∩G| / |P∪G|`` of two binary masks of one shape; 1.0 if both are empty (medpy ``jc``)."""
    pred, gt = _as_bool(pred), _as_bool(gt)
    _check_pair(pred, gt)
    value = compute_iou(torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None], ignore_empty=False)
    return float(value)


def directed_surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Optional[Sequence[float]] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Directed surface distances of two non-empty binary masks of one shape (medpy's ``__surface_distances``).

    Args:
        pred: predicted mask, any shape ``(*S)``, nonzero = foreground.
        gt: ground-truth mask, shape ``(*S)``.
        spacing: voxel size per axis (mm); ``None`` measures in voxels.

    Returns:
        ``(pred_to_gt, gt_to_pred)``: float64 vectors with one distance per surface voxel of ``pred`` (to the
        nearest surface voxel of ``gt``) and of ``gt`` (to ``pred``).

    Raises:
        ValueError: if either mask is empty (the distances are undefined).
    """
    return _distances(*_surfaces(pred, gt), spacing)


def _surfaces(pred: np.ndarray, gt: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    pred, gt = _as_bool(pred), _as_bool(gt)
    _check_pair(pred, gt)
    if not pred.any() or not gt.any():
        raise ValueError("surface distances are undefined for an empty mask.")
    return get_mask_edges(pred, gt, crop=True, spacing=None)


def _distances(
    edges_pred: np.ndarray, edges_gt: np.ndarray, spacing: Optional[Sequence[float]]
) -> Tuple[np.ndarray, np.ndarray]:
    to_gt = distance_transform_edt(~edges_gt, sampling=spacing)[edges_pred]
    to_pred = distance_transform_edt(~edges_pred, sampling=spacing)[edges_gt]
    return to_gt, to_pred


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Optional[Sequence[float]] = None) -> float:
    """95th percentile of the pooled directed surface distances (medpy ``hd95``); raises ``ValueError`` if a mask
    is empty."""
    to_gt, to_pred = directed_surface_distances(pred, gt, spacing)
    return float(np.percentile(np.concatenate([to_gt, to_pred]), 95))


def asd(pred: np.ndarray, gt: np.ndarray, spacing: Optional[Sequence[float]] = None) -> float:
    """Mean directed surface distance pred -> gt (medpy ``asd``, not symmetric); raises ``ValueError`` if a mask
    is empty."""
    return float(directed_surface_distances(pred, gt, spacing)[0].mean())


def binary_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Optional[Sequence[float]] = None) -> Dict[str, float]:
    """Dice, Jaccard, HD95 and ASD of one binary mask pair with the papers' empty-mask conventions, then sensitivity
    and precision (module docstring).

    Args:
        pred: predicted mask ``(*S)``, nonzero = foreground.
        gt: ground-truth mask ``(*S)``.
        spacing: voxel size per axis in mm. When given, ``hd95_mm`` and ``asd_mm`` are added; ``hd95`` and ``asd``
            are always in voxels.

    Returns:
        ``{"dice", "jaccard", "hd95", "asd"}`` (+ ``"hd95_mm", "asd_mm"``) + ``{"sensitivity", "precision"}`` as
        floats.
    """
    pred, gt = _as_bool(pred), _as_bool(gt)
    _check_pair(pred, gt)
    units = {"": None} if spacing is None else {"": None, "_mm": spacing}
    if not pred.any():
        result = {"dice": 0.0, "jaccard": 0.0, **{f"{m}{u}": 0.0 for u in units for m in DISTANCE_METRICS}}
        return {**result, **overlap_rates(pred, gt)}
    result = {"dice": dice(pred, gt), "jaccard": jaccard(pred, gt)}
    edges = _surfaces(pred, gt) if gt.any() else None
    for suffix, unit_spacing in units.items():
        if edges is None:
            result[f"hd95{suffix}"] = result[f"asd{suffix}"] = float("nan")
            continue
        to_gt, to_pred = _distances(*edges, unit_spacing)
        result[f"hd95{suffix}"] = float(np.percentile(np.concatenate([to_gt, to_pred]), 95))
        result[f"asd{suffix}"] = float(to_gt.mean())
    return {**result, **overlap_rates(pred, gt)}


def overlap_rates(pred: np.ndarray, gt: np.ndarray) -> Dict[str, float]:
    """``sensitivity`` ``|P∩G| / |G|`` and ``precision`` ``|P∩G| / |P|`` of two boolean masks of one shape, each
    ``nan`` when its denominator is empty."""
    overlap = float(np.count_nonzero(pred & gt))
    truth, predicted = np.count_nonzero(gt), np.count_nonzero(pred)
    return {
        "sensitivity": overlap / truth if truth else float("nan"),
        "precision": overlap / predicted if predicted else float("nan"),
    }


def case_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    classes: Optional[Sequence[int]] = None,
    spacing: Optional[Sequence[float]] = None,
) -> Dict[str, float]:
    """Metrics of one case from two label maps (integer class indices, one shape).

    Args:
        pred: predicted label map ``(*S)``.
        gt: ground-truth label map ``(*S)``.
        classes: ``None`` scores the binary "any foreground" masks (``label > 0``) and returns the plain keys
            ``dice, jaccard, hd95, asd``; a list of class indices scores each class ``c`` on its own mask
            (``label == c``) and suffixes the keys: ``dice_1, jaccard_1, ...``.
        spacing: voxel size per axis in mm, adds the ``_mm`` distance variants (see :func:`binary_metrics`).

    Returns:
        a flat ``{column: value}`` dict, one row of ``metrics.csv``.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if classes is None:
        return binary_metrics(pred > 0, gt > 0, spacing)
    row: Dict[str, float] = {}
    for c in classes:
        row.update({f"{k}_{c}": v for k, v in binary_metrics(pred == c, gt == c, spacing).items()})
    return row
