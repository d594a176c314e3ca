"""Evaluation reports: folder pairing, metrics.csv against medpy, summary, figures, the CLI and evaluate.json."""

import csv
import json
import os
import runpy
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from medpy.metric import binary as medpy
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor
from scipy.ndimage import gaussian_filter
from torch import nn

from bundle.inference.evaluation import MetricsReportHandler, evaluate_folders, figure_slices
from bundle.networks.subnets import SoftmaxEnsemble
from tests.conftest import BRATS_DIR, REPO_ROOT, raises_bundle_error

TOL = 1e-6
SPACING = (0.8, 1.2, 2.0)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _save(path, array, affine):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def _medpy_row(pred, gt, spacing):
    return {
        "dice": medpy.dc(pred, gt),
        "jaccard": medpy.jc(pred, gt),
        "hd95": medpy.hd95(pred, gt),
        "asd": medpy.asd(pred, gt),
        "hd95_mm": medpy.hd95(pred, gt, spacing),
        "asd_mm": medpy.asd(pred, gt, spacing),
        "sensitivity": medpy.sensitivity(pred, gt),
        "precision": medpy.precision(pred, gt),
    }


@pytest.fixture
def folders(tmp_path):
    """Case a: two random blobs; b: empty prediction; c: prediction only; d: label only. Anisotropic voxels."""
    rng = np.random.default_rng(3)
    affine = np.diag([*SPACING, 1.0])
    blobs = [(gaussian_filter(rng.standard_normal((22, 18, 12)), 2.0) > 0.2).astype(np.uint8) for _ in range(3)]
    _save(tmp_path / "pred" / "a.nii.gz", blobs[0], affine)
    _save(tmp_path / "label" / "a.nii.gz", blobs[1], affine)
    _save(tmp_path / "image" / "a.nii.gz", rng.random((22, 18, 12)).astype(np.float32), affine)
    _save(tmp_path / "pred" / "b.nii", np.zeros_like(blobs[0]), affine)
    _save(tmp_path / "label" / "b.nii.gz", blobs[2], affine)
    _save(tmp_path / "pred" / "c.nii.gz", blobs[0], affine)
    _save(tmp_path / "label" / "d.nii.gz", blobs[1], affine)
    _save(tmp_path / "pred" / "probabilities" / "a.nii.gz", blobs[0], affine)  # sub-folders are not predictions
    return tmp_path, blobs


def test_folders_metrics_csv_summary_and_figures(folders):
    root, blobs = folders
    summary = evaluate_folders(
        str(root / "pred"), str(root / "label"), str(root / "out"), image_dir=str(root / "image"), allow_unpaired=True
    )
    rows = _read_csv(root / "out" / "metrics.csv")
    assert list(rows[0]) == ["case", "dice", "jaccard", "hd95", "asd", "hd95_mm", "asd_mm", "sensitivity", "precision"]
    assert [row["case"] for row in rows] == ["a", "b"]
    empty = {**dict.fromkeys(rows[0], 0.0), "precision": float("nan")}  # an empty prediction has no precision
    expected = {"a": _medpy_row(blobs[0] > 0, blobs[1] > 0, SPACING), "b": empty}
    for row in rows:
        for column, value in expected[row["case"]].items():
            if column != "case":
                assert float(row[column]) == pytest.approx(value, abs=TOL, nan_ok=True), (row["case"], column)

    on_disk = json.loads((root / "out" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["num_cases"] == 2 and summary["empty_predictions"] == ["b"]
    assert summary["unpaired_predictions"] == ["c"] and summary["unpaired_labels"] == ["d"]
    for column in ("dice", "hd95_mm"):
        values = [expected["a"][column], 0.0]
        assert summary["metrics"][column]["mean"] == pytest.approx(np.mean(values), abs=TOL)
        assert summary["metrics"][column]["std"] == pytest.approx(np.std(values), abs=TOL)
        assert summary["metrics"][column]["n"] == 2
    for case in ("a", "b"):
        figure = (root / "out" / "figures" / f"{case}.png").read_bytes()
        assert figure.startswith(PNG_SIGNATURE) and len(figure) > 5000


def test_figure_slices_are_spread_over_the_ground_truth():
    label = np.zeros((4, 4, 20))
    label[..., 4:13] = 1  # slices 4..12: quantiles 25/50/75 % -> 6, 8, 10
    assert figure_slices(label, np.zeros_like(label), 3) == [6, 8, 10]
    assert figure_slices(np.zeros_like(label), np.zeros_like(label), 1) == [10]


def test_per_class_columns(tmp_path):
    pred, label = np.zeros((12, 10, 8), np.uint8), np.zeros((12, 10, 8), np.uint8)
    pred[1:5, 1:6, 1:6], pred[6:10, 2:7, 2:6] = 1, 2
    label[2:6, 1:6, 1:6], label[6:11, 2:7, 2:7] = 1, 2
    _save(tmp_path / "p" / "x.nii.gz", pred, np.eye(4))
    _save(tmp_path / "l" / "x.nii.gz", label, np.eye(4))
    evaluate_folders(str(tmp_path / "p"), str(tmp_path / "l"), str(tmp_path / "o"), classes=[1, 2], num_slices=0)
    row = _read_csv(tmp_path / "o" / "metrics.csv")[0]
    assert float(row["dice_2"]) == pytest.approx(medpy.dc(pred == 2, label == 2), abs=TOL)
    assert float(row["hd95_mm_1"]) == pytest.approx(medpy.hd95(pred == 1, label == 1), abs=TOL)
    assert not (tmp_path / "o" / "figures").exists()


def test_mismatched_grids_and_no_pairs_are_errors(tmp_path):
    _save(tmp_path / "p" / "x.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    _save(tmp_path / "l" / "x.nii.gz", np.zeros((4, 4, 4), np.uint8), np.diag([-1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="different voxel grids"):
        evaluate_folders(str(tmp_path / "p"), str(tmp_path / "l"), str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no prediction"):
        evaluate_folders(str(tmp_path / "p"), str(tmp_path / "empty"), str(tmp_path / "o"))


def test_command_line_from_another_directory(folders, monkeypatch, capsys):
    """``python scripts/evaluate.py PRED LABEL --output_dir OUT`` run as __main__ (in this process, to skip a
    second interpreter start-up) from outside the repository."""
    root, _ = folders
    script = str(REPO_ROOT / "scripts" / "evaluate.py")
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", [script, "pred", "label", "--output_dir", "cli", "--allow_unpaired", "yes"])
    runpy.run_path(script, run_name="__main__")
    stdout = capsys.readouterr().out
    assert "2 cases, 1 empty predictions" in stdout
    dice_line = next(line for line in stdout.splitlines() if line.startswith("dice"))
    assert "±" in dice_line and "(n=2)" in dice_line
    assert [row["case"] for row in _read_csv(root / "cli" / "metrics.csv")] == ["a", "b"]


def test_evaluate_json_overlay_scores_the_model_on_the_validation_list(tmp_path):
    """train.json + evaluate.json on a tiny MSD dataset, with model.pt of a pointwise ensemble (foreground iff the
    z-scored image is > 0): metrics.csv must hold medpy's values of (image > mean) against each label, on the
    input grid (flipped, anisotropic affine) in voxels and mm."""
    rng = np.random.default_rng(5)
    affine = np.diag([-1.0, 1.0, 1.5, 1.0])
    spec = {"training": [], "validation": []}
    images = {}
    for index in range(4):
        image = rng.random((20, 18, 12)).astype(np.float32)
        label = np.zeros(image.shape, np.uint8)
        label[3 + index : 12, 4:14, 2:9] = 1
        image[label > 0] += 5.0
        image[2:6, 2:5, 1:3] += 5.0  # false positives of the model
        name = f"case{index}.nii.gz"
        _save(tmp_path / "data" / "imagesTr" / name, image, affine)
        _save(tmp_path / "data" / "labelsTr" / name, label, affine)
        entry = {"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"}
        spec["validation" if index >= 2 else "training"].append(entry if index != 1 else {"image": entry["image"]})
        images[f"case{index}"] = (image, label)
    (tmp_path / "data" / "dataset.json").write_text(json.dumps(spec))
    network = _pointwise_ensemble()
    torch.save(network.state_dict(), tmp_path / "model.pt")

    def evaluate(ckpt_path):
        workflow = ConfigWorkflow(
            config_file=[str(REPO_ROOT / "configs" / "train.json"), str(REPO_ROOT / "configs" / "evaluate.json")],
            logging_file=False,
            workflow_type="infer",
            dataset_dir=str(tmp_path / "data"),
            output_dir=str(tmp_path / "out"),
            ckpt_path=str(ckpt_path),
            num_labeled=1,
            base_width=2,
            patch_size=[16, 16, 16],  # the settings check wants multiples of 16; the pointwise network takes any size
            sw_strides=[4, 4, 4],
            network_def=_pointwise_ensemble(zero=True),
        )
        workflow.initialize()
        workflow.run()

    (tmp_path / "truncated.pt").write_bytes((tmp_path / "model.pt").read_bytes()[:100])
    for bad, reason in (("missing.pt", "no trained weights"), ("truncated.pt", "not a complete weights file")):
        with raises_bundle_error() as exit_info:
            evaluate(tmp_path / bad)
        assert str(exit_info[0]).startswith(f"Cannot evaluate:\n  {tmp_path / bad}: {reason}")
    assert not (tmp_path / "out" / "metrics.csv").exists()
    evaluate(tmp_path / "model.pt")
    rows = _read_csv(tmp_path / "out" / "metrics.csv")
    assert [row["case"] for row in rows] == ["case2", "case3"]
    for row in rows:
        image, label = images[row["case"]]
        expected = _medpy_row(image > image.mean(), label > 0, (1.0, 1.0, 1.5))
        for column, value in expected.items():
            assert float(row[column]) == pytest.approx(value, abs=TOL), (row["case"], column)
    assert sorted(os.listdir(tmp_path / "out" / "figures")) == ["case2.png", "case3.png"]


def _handler_output(pred, label_tensor, label_path):
    engine = type("Engine", (), {})()
    engine.state = type("State", (), {})()
    label = MetaTensor(label_tensor, meta={"filename_or_obj": str(label_path)})
    engine.state.output = [{"pred": torch.as_tensor(pred)[None], "label": label}]
    return engine


def test_handler_scores_against_the_original_label_file_not_the_resampled_one(tmp_path):
    """The cpu protocol zooms labels by 0.5: a 1-voxel-thick sheet can vanish from the zoomed label. The handler must
    score the prediction (already on the original grid) against the label file as stored, in voxels and mm."""
    label = np.zeros((16, 14, 10), np.uint8)
    label[4:12, 3:11, 2:8] = 1
    label[13, 2:12, 1:9] = 1  # a thin sheet that nearest zoom x0.5 drops (odd index)
    pred = np.zeros_like(label)
    pred[5:12, 3:10, 2:9] = 1
    affine = np.diag([1.5, 1.0, 2.5, 1.0])
    _save(tmp_path / "case7.nii.gz", label, affine)
    zoomed = torch.as_tensor(label[None, ::2, ::2, ::2].astype(np.float32))  # what Invertd would have degraded
    handler = MetricsReportHandler(str(tmp_path / "out"), num_slices=0)
    handler.iteration_completed(_handler_output(pred, zoomed, tmp_path / "case7.nii.gz"))
    row = handler.report.rows[0]
    assert row["case"] == "case7"
    for column, value in _medpy_row(pred > 0, label > 0, (1.5, 1.0, 2.5)).items():
        assert row[column] == pytest.approx(value, abs=TOL), column


def test_handler_writes_predictions_when_asked(tmp_path):
    label = np.zeros((8, 8, 6), np.uint8)
    label[2:6, 2:6, 1:5] = 1
    pred = np.zeros_like(label)
    pred[3:6, 2:6, 1:5] = 1
    _save(tmp_path / "case3.nii.gz", label, np.eye(4))
    handler = MetricsReportHandler(str(tmp_path / "out"), num_slices=0, predictions_dir=str(tmp_path / "preds"))
    handler.iteration_completed(_handler_output(pred, torch.as_tensor(label[None].astype(np.float32)),
                                                tmp_path / "case3.nii.gz"))  # fmt: skip
    assert os.listdir(tmp_path / "preds") == ["case3.npz"]
    saved = np.load(tmp_path / "preds" / "case3.npz")["pred"]
    assert saved.dtype == np.uint8 and np.array_equal(saved, pred)


def test_handler_rejects_a_prediction_off_the_label_grid(tmp_path):
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:5, 2:5, 2:5] = 1
    _save(tmp_path / "c.nii.gz", label, np.eye(4))
    handler = MetricsReportHandler(str(tmp_path / "out"), num_slices=0)
    with pytest.raises(ValueError, match=r"c\.nii\.gz: prediction shape \(4, 4, 4\)"):
        output = _handler_output(np.zeros((4, 4, 4)), torch.zeros(1, 8, 8, 8), tmp_path / "c.nii.gz")
        handler.iteration_completed(output)


def _pointwise_ensemble(zero=False):
    """Ensemble of two 1x1x1 convolutions with logits (0, 4x) and (0, 2x); ``zero=True`` gives all-zero weights,
    which only a checkpoint load can turn into the working model."""
    subnets = []
    for gain in (4.0, 2.0):
        conv = nn.Conv3d(1, 2, kernel_size=1)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([0.0, 0.0 if zero else gain]).view(2, 1, 1, 1, 1))
            conv.bias.zero_()
        subnets.append(conv)
    return SoftmaxEnsemble(*subnets)


@pytest.mark.skipif(not BRATS_DIR.is_dir(), reason="../shared/data/BraTS_demo is not present")
def test_two_real_brats_cases_against_medpy(tmp_path):
    """Predictions = each whole-tumour mask shifted by 3 voxels, written with the label's header."""
    cases = sorted(p.name for p in BRATS_DIR.iterdir() if p.is_dir())[:2]
    expected = {}
    for case in cases:
        os.makedirs(tmp_path / "label", exist_ok=True)
        os.symlink(BRATS_DIR / case / "GT_W.nii.gz", tmp_path / "label" / f"{case}.nii.gz")
        label_image = nib.load(str(BRATS_DIR / case / "GT_W.nii.gz"))
        label = np.asarray(label_image.dataobj) > 0
        pred = np.roll(label, 3, axis=0)
        _save(tmp_path / "pred" / f"{case}.nii.gz", pred.astype(np.uint8), label_image.affine)
        # medpy on the union's bounding box with a 2-voxel zero margin: the surfaces and their distances are those
        # of the full volume (neither mask touches the border), at a fraction of medpy's full-volume time.
        low, high = np.argwhere(pred | label).min(0), np.argwhere(pred | label).max(0) + 1
        box = tuple(slice(a, b) for a, b in zip(low, high))
        pred_box, label_box = np.pad(pred[box], 2), np.pad(label[box], 2)
        expected[case] = {
            "dice": medpy.dc(pred_box, label_box),
            "hd95": medpy.hd95(pred_box, label_box),
            "asd": medpy.asd(pred_box, label_box),
        }
    evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "label"), str(tmp_path / "out"), num_slices=1)
    rows = {row["case"]: row for row in _read_csv(tmp_path / "out" / "metrics.csv")}
    assert sorted(rows) == cases
    for case in cases:
        for column, value in expected[case].items():
            assert float(rows[case][column]) == pytest.approx(value, abs=TOL), (case, column)
        # 1 mm isotropic voxels: the mm variants equal the voxel ones
        assert float(rows[case]["hd95_mm"]) == pytest.approx(expected[case]["hd95"], abs=TOL)
