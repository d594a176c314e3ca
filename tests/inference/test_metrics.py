"""Metrics against medpy 0.5.2 (the papers' implementation) and hand-computed values, to 1e-6."""

import math

import numpy as np
import pytest
from medpy.metric import binary as medpy
from scipy.ndimage import gaussian_filter

from bundle.inference.metrics import asd, binary_metrics, case_metrics, dice, directed_surface_distances, hd95, jaccard

TOL = 1e-6


def _blobs(seed, shape=(24, 20, 16)):
    """Two random smooth blobs; some touch the array border, which the surface definition must handle."""
    rng = np.random.default_rng(seed)
    return [gaussian_filter(rng.standard_normal(shape), 2.0) > 0.1 for _ in range(2)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spacing", [None, (0.7, 1.3, 2.5)])
def test_equal_to_medpy(seed, spacing):
    pred, gt = _blobs(seed)
    expected = {
        "dice": medpy.dc(pred, gt),
        "jaccard": medpy.jc(pred, gt),
        "hd95": medpy.hd95(pred, gt),
        "asd": medpy.asd(pred, gt),
        "sensitivity": medpy.sensitivity(pred, gt),
        "precision": medpy.precision(pred, gt),
    }
    if spacing is not None:
        expected.update(hd95_mm=medpy.hd95(pred, gt, spacing), asd_mm=medpy.asd(pred, gt, spacing))
    result = binary_metrics(pred, gt, spacing)
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=TOL), key
    assert hd95(pred, gt, spacing) == pytest.approx(medpy.hd95(pred, gt, spacing), abs=TOL)
    assert asd(pred, gt, spacing) == pytest.approx(medpy.asd(pred, gt, spacing), abs=TOL)


def test_pooled_hd95_and_directed_asd_closed_form():
    """gt = one voxel; pred = two voxels at distances 1 and 3 from it.

    pred->gt = [1, 3], gt->pred = [1]; pooled sorted [1, 1, 3] -> 95th percentile 1 + 0.9 * 2 = 2.8 (MONAI's
    max of directed percentiles would give 2.9); ASD = mean(pred->gt) = 2 (symmetric ASSD would give 5/3)."""
    gt = np.zeros((9, 5, 5), bool)
    pred = np.zeros_like(gt)
    gt[4, 2, 2] = True
    pred[3, 2, 2] = pred[7, 2, 2] = True
    to_gt, to_pred = directed_surface_distances(pred, gt)
    assert sorted(to_gt) == [1.0, 3.0] and list(to_pred) == [1.0]
    assert hd95(pred, gt) == pytest.approx(2.8, abs=TOL)
    assert asd(pred, gt) == pytest.approx(2.0, abs=TOL)
    assert asd(gt, pred) == pytest.approx(1.0, abs=TOL)
    assert dice(pred, gt) == 0.0 and jaccard(pred, gt) == 0.0


def test_spacing_scales_distances_closed_form():
    """Single voxels 3 apart in x and 4 in y: 5 voxels; with spacing (2, 1, 1) mm: sqrt(6^2 + 4^2) mm."""
    pred, gt = np.zeros((8, 8, 3), bool), np.zeros((8, 8, 3), bool)
    pred[1, 1, 1], gt[4, 5, 1] = True, True
    result = binary_metrics(pred, gt, spacing=(2.0, 1.0, 1.0))
    assert result["hd95"] == pytest.approx(5.0, abs=TOL) and result["asd"] == pytest.approx(5.0, abs=TOL)
    assert result["hd95_mm"] == pytest.approx(math.sqrt(52.0), abs=TOL)
    assert result["asd_mm"] == pytest.approx(math.sqrt(52.0), abs=TOL)


def test_overlap_closed_form():
    """Boxes of 4x4x4 = 64 voxels overlapping in 2x4x4 = 32: Dice 64/128 = 0.5, Jaccard 32/96 = 1/3."""
    pred, gt = np.zeros((10, 6, 6), bool), np.zeros((10, 6, 6), bool)
    pred[1:5, 1:5, 1:5], gt[3:7, 1:5, 1:5] = True, True
    assert dice(pred, gt) == pytest.approx(0.5, abs=TOL)
    assert jaccard(pred, gt) == pytest.approx(1 / 3, abs=TOL)


def test_sensitivity_and_precision_closed_form():
    """Prediction 4x4x4 = 64 voxels inside a 6x4x4 = 96-voxel truth: sensitivity 64/96, precision 1 (an
    under-segmentation); swapped, an over-segmentation: sensitivity 1, precision 64/96. Columns come last."""
    pred, gt = np.zeros((10, 6, 6), bool), np.zeros((10, 6, 6), bool)
    pred[2:6, 1:5, 1:5], gt[1:7, 1:5, 1:5] = True, True
    under, over = binary_metrics(pred, gt, spacing=(1, 1, 1)), binary_metrics(gt, pred)
    assert under["sensitivity"] == pytest.approx(64 / 96) and under["precision"] == 1.0
    assert over["sensitivity"] == 1.0 and over["precision"] == pytest.approx(64 / 96)
    assert under["dice"] == over["dice"] == pytest.approx(128 / 160)  # Dice alone does not tell them apart
    assert list(under)[-2:] == ["sensitivity", "precision"] and list(under)[-3] == "asd_mm"


def test_empty_prediction_scores_zero_papers_convention():
    gt = np.zeros((6, 6, 6), bool)
    gt[2:4, 2:4, 2:4] = True
    empty = np.zeros_like(gt)
    expected = {"dice": 0.0, "jaccard": 0.0, "hd95": 0.0, "asd": 0.0, "hd95_mm": 0.0, "asd_mm": 0.0}
    result = binary_metrics(empty, gt, spacing=(1, 1, 2))
    assert {k: result.pop(k) for k in expected} == expected and result.pop("sensitivity") == 0.0
    assert list(result) == ["precision"] and math.isnan(result["precision"])  # no predicted voxel to be precise
    result = binary_metrics(empty, empty, spacing=(1, 1, 2))
    assert {k: result[k] for k in expected} == expected  # both empty: also zeros (papers' rule)
    assert math.isnan(result["sensitivity"]) and math.isnan(result["precision"])


def test_empty_ground_truth_gives_zero_overlap_and_undefined_distances():
    pred = np.zeros((6, 6, 6), bool)
    pred[1:3, 1:3, 1:3] = True
    result = binary_metrics(pred, np.zeros_like(pred))
    assert result["dice"] == 0.0 and result["jaccard"] == 0.0 and result["precision"] == 0.0
    assert math.isnan(result["hd95"]) and math.isnan(result["asd"]) and math.isnan(result["sensitivity"])
    with pytest.raises(ValueError, match="empty"):
        hd95(pred, np.zeros_like(pred))


def test_plain_dice_and_jaccard_of_two_empty_masks_are_one():
    """medpy's jc gives 1.0 here; its dc divides numpy zeros and gives nan, which we do not copy."""
    empty = np.zeros((4, 4, 4), bool)
    assert dice(empty, empty) == 1.0
    assert jaccard(empty, empty) == medpy.jc(empty, empty) == 1.0


def test_multiclass_per_class_and_binary_foreground():
    pred, gt = np.zeros((12, 10, 8), np.int16), np.zeros((12, 10, 8), np.int16)
    pred[1:5, 1:6, 1:6], pred[6:10, 2:7, 2:6] = 1, 2
    gt[2:6, 1:6, 1:6], gt[6:11, 2:7, 2:7] = 1, 2
    per_class = case_metrics(pred, gt, classes=[1, 2])
    metrics = ("dice", "jaccard", "hd95", "asd", "sensitivity", "precision")
    assert list(per_class) == [f"{m}_{c}" for c in (1, 2) for m in metrics]
    for c in (1, 2):
        assert per_class[f"dice_{c}"] == pytest.approx(medpy.dc(pred == c, gt == c), abs=TOL)
        assert per_class[f"sensitivity_{c}"] == pytest.approx(medpy.sensitivity(pred == c, gt == c), abs=TOL)
        assert per_class[f"hd95_{c}"] == pytest.approx(medpy.hd95(pred == c, gt == c), abs=TOL)
        assert per_class[f"asd_{c}"] == pytest.approx(medpy.asd(pred == c, gt == c), abs=TOL)
    foreground = case_metrics(pred, gt)
    assert foreground["dice"] == pytest.approx(medpy.dc(pred > 0, gt > 0), abs=TOL)
    assert foreground["hd95"] == pytest.approx(medpy.hd95(pred > 0, gt > 0), abs=TOL)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        binary_metrics(np.ones((4, 4, 4)), np.ones((4, 4, 5)))
