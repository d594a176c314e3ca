"""Ranking scans by uncertainty (configs/rank.json): score values on hand-made maps, order, CSV, bad scans, LA h5."""

import csv
import math

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from scipy.ndimage import binary_dilation
from torch import nn

from bundle.data.datalists import DatasetError
from bundle.inference.ranking import CSV_COLUMNS, rank_rows, scan_datalist, score_scan, write_ranking_csv
from bundle.networks.subnets import SoftmaxEnsemble, SoftmaxOutput
from tests.conftest import REPO_ROOT, raises_bundle_error

CONFIGS = [str(REPO_ROOT / "configs" / name) for name in ("inference.json", "rank.json")]
SINGLE = str(REPO_ROOT / "configs" / "inference_single_net.json")
SPACING = (1.5, 2.0, 0.5)  # mm: one voxel is 1.5 µL


def _entropy(p):
    return -sum(q * math.log(q) for q in (p, 1 - p) if q > 0)


def _maps(fg_box, fg_band, fg_out, dis_box, dis_band, dis_out):
    """8³ maps: a 2³ foreground box at [3:5]³, its 1-voxel band [2:6]³ minus the box, and the rest."""
    fg = torch.full((8, 8, 8), fg_out)
    dis = torch.full((1, 8, 8, 8), dis_out)
    fg[2:6, 2:6, 2:6], dis[0, 2:6, 2:6, 2:6] = fg_band, dis_band
    fg[3:5, 3:5, 3:5], dis[0, 3:5, 3:5, 3:5] = fg_box, dis_box
    return torch.stack([1 - fg, fg]), dis


# ---------------------------------------------------------------------------------------------- scores
def test_identical_subnets_disagree_nowhere():
    prob, _ = _maps(0.9, 0.3, 0.0, 0, 0, 0)
    scores = score_scan(prob, torch.zeros(1, 8, 8, 8), band_voxels=1)
    assert scores["disagreement"] == 0.0


def test_known_disagreement_and_entropy_over_foreground_and_band():
    """Box 8 voxels (disagreement 0.4, p_fg 0.9), band 56 voxels (0.2, p_fg 0.3); outside (1.0, p_fg 0) is ignored."""
    prob, dis = _maps(0.9, 0.3, 0.0, 0.4, 0.2, 1.0)
    scores = score_scan(prob, dis, band_voxels=1)
    assert scores["foreground_voxels"] == 8 and scores["region_voxels"] == 64
    assert scores["disagreement"] == pytest.approx((8 * 0.4 + 56 * 0.2) / 64, abs=1e-7)  # 0.225
    assert scores["entropy"] == pytest.approx((8 * _entropy(0.9) + 56 * _entropy(0.3)) / 64, abs=1e-6)
    inside = score_scan(prob, dis, band_voxels=0)  # no band: the foreground only
    assert (inside["region_voxels"], inside["disagreement"]) == (8, pytest.approx(0.4))
    assert inside["entropy"] == pytest.approx(_entropy(0.9), abs=1e-6)
    wide = score_scan(prob, dis, band_voxels=3)  # [0:8]³: the whole volume
    assert wide["region_voxels"] == 512 and wide["disagreement"] == pytest.approx((3.2 + 11.2 + 448) / 512)


def test_empty_prediction_scores_the_whole_volume_and_single_network_has_no_disagreement():
    prob, dis = _maps(0.2, 0.2, 0.1, 0.5, 0.5, 0.1)
    scores = score_scan(prob, None, band_voxels=2)
    assert scores["foreground_voxels"] == 0 and scores["region_voxels"] == 512
    assert math.isnan(scores["disagreement"])
    assert scores["entropy"] == pytest.approx((64 * _entropy(0.2) + 448 * _entropy(0.1)) / 512, abs=1e-6)


def test_non_finite_maps_and_bad_band_are_errors():
    prob, dis = _maps(0.9, 0.3, 0.0, 0.4, 0.2, 1.0)
    dis[0, 3, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        score_scan(prob, dis, band_voxels=1)
    with pytest.raises(ValueError, match="band_voxels"):
        score_scan(prob, None, band_voxels=-1)


# --------------------------------------------------------------------------------------------- ranking
def test_rank_order_ties_by_name_and_csv_columns(tmp_path):
    rows = [
        {"scan": "b", "disagreement": 0.1, "entropy": 0.5, "foreground_voxels": 3, "foreground_ml": None, "path": "b"},
        {"scan": "a", "disagreement": 0.1, "entropy": 0.2, "foreground_voxels": 0, "foreground_ml": 0.0, "path": "a"},
        {"scan": "c", "disagreement": 0.3, "entropy": 0.1, "foreground_voxels": 9, "foreground_ml": 1.5, "path": "c"},
    ]
    assert [r["scan"] for r in rank_rows(rows, "disagreement")] == ["c", "a", "b"]
    ranked = rank_rows(rows, "entropy")
    assert [(r["rank"], r["scan"]) for r in ranked] == [(1, "b"), (2, "a"), (3, "c")]
    with pytest.raises(ValueError, match="rank_by"):
        rank_rows(rows, "dice")
    write_ranking_csv(ranked, str(tmp_path / "ranking.csv"))
    lines = (tmp_path / "ranking.csv").read_text().splitlines()
    assert lines[0] == ",".join(CSV_COLUMNS)
    assert lines[0] == "rank,scan,disagreement,entropy,ranked_by,foreground_voxels,foreground_ml,path"
    assert lines[1] == "1,b,0.1,0.5,entropy,3,n/a,b"
    assert [p.name for p in tmp_path.iterdir()] == ["ranking.csv"]  # no temporary file left


# --------------------------------------------------------------------------------------- the command
def _pointwise(gain):
    conv = nn.Conv3d(1, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.0, gain]).view(2, 1, 1, 1, 1))
        conv.bias.zero_()
    return conv


def _image(box_value, shape=(16, 12, 8)):
    """A box on [0, 0.5) noise: after z-scoring, the box is foreground for both point-wise subnets."""
    image = 0.5 * np.random.default_rng(0).random(shape).astype(np.float32)
    image[3:9, 4:10, 2:6] = box_value
    return image


def _write(path, array):
    nib.save(nib.Nifti1Image(array, np.diag([*SPACING, 1.0])), str(path))


def _expected(image, band=1):
    """Closed form of the point-wise ensemble (logits (0, 4x) and (0, 2x)) and of the scores, in numpy."""
    x = (image - image.mean()) / image.std()
    prob_a, prob_b = 1 / (1 + np.exp(-4 * x)), 1 / (1 + np.exp(-2 * x))
    mean = (prob_a + prob_b) / 2
    region = binary_dilation(mean > 0.5, structure=np.ones((3,) * 3), iterations=band)
    entropy = -(mean * np.log(mean) + (1 - mean) * np.log(1 - mean))
    return abs(prob_a - prob_b)[region].mean(), entropy[region].mean(), int((mean > 0.5).sum())


def _run(config_files, dataset_dir, output_dir, network_def, **override):
    settings = dict(ckpt_path=None, patch_size=[8, 8, 8], sw_strides=[4, 4, 4], rank_band_voxels=1, precision="fp32")
    workflow = ConfigWorkflow(
        config_file=config_files,
        logging_file=False,
        workflow_type="infer",
        dataset_dir=str(dataset_dir),
        output_dir=str(output_dir),
        network_def=network_def,
        **settings,
        **override,
    )
    workflow.initialize()
    workflow.run()


def _read(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_nifti_folder_is_ranked_scored_and_a_broken_scan_skipped(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    images = {"low": _image(3.0), "high": _image(40.0), "mid": _image(8.0)}
    for name, image in images.items():
        _write(folder / f"{name}.nii.gz", image)
    (folder / "broken.nii.gz").write_bytes(b"not a nifti file")
    with raises_bundle_error() as exit_info:
        _run(CONFIGS, folder, tmp_path / "out", SoftmaxEnsemble(_pointwise(4.0), _pointwise(2.0)))
    assert str(exit_info[0]).startswith("3 of 4 images")
    assert f"{folder / 'broken.nii.gz'}: " in str(exit_info[0])

    rows = _read(tmp_path / "out" / "ranking.csv")
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [r["rank"] for r in rows] == ["1", "2", "3"] and {r["ranked_by"] for r in rows} == {"disagreement"}
    scores = [float(r["disagreement"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    for row in rows:
        disagreement, entropy, voxels = _expected(images[row["scan"]])
        assert float(row["disagreement"]) == pytest.approx(disagreement, rel=1e-4)
        assert float(row["entropy"]) == pytest.approx(entropy, rel=1e-4)
        assert int(row["foreground_voxels"]) == voxels == 6 * 6 * 4
        assert float(row["foreground_ml"]) == pytest.approx(voxels * 1.5e-3)
    assert (tmp_path / "out" / "ranking.png").stat().st_size > 5000
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "ranking.csv", "ranking.png"]


def test_single_network_is_ranked_by_entropy_and_has_no_disagreement(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, value in (("a", 3.0), ("b", 40.0)):
        _write(folder / f"{name}.nii.gz", _image(value))
    _run(CONFIGS[:1] + [SINGLE, CONFIGS[1]], folder, tmp_path / "out", SoftmaxOutput(_pointwise(2.0)))
    rows = _read(tmp_path / "out" / "ranking.csv")
    assert {r["disagreement"] for r in rows} == {"n/a"} and {r["ranked_by"] for r in rows} == {"entropy"}
    entropies = [float(r["entropy"]) for r in rows]
    assert entropies == sorted(entropies, reverse=True) and entropies[0] > entropies[1] > 0
    with pytest.raises(RuntimeError, match="FolderRanking") as error:  # MONAI wraps the constructor's error
        _run(CONFIGS[:1] + [SINGLE, CONFIGS[1]], folder, tmp_path / "x", SoftmaxOutput(_pointwise(2.0)),
             rank_by="disagreement")  # fmt: skip
    assert "rank_by 'disagreement' needs a model with two subnets" in str(error.value.__cause__)


def test_la_case_list_ranks_h5_cases_and_reports_a_missing_one(tmp_path):
    cases = {"case_b": _image(40.0), "case_a": _image(3.0)}
    for case, image in cases.items():
        (tmp_path / case).mkdir()
        with h5py.File(tmp_path / case / "mri_norm2.h5", "w") as handle:
            handle["image"], handle["label"] = image, (image > 2).astype(np.uint8)
    (tmp_path / "pool.list").write_text("case_b\nmissing\ncase_a\n")
    assert [item["scan"] for item in scan_datalist(str(tmp_path), "pool.list")] == ["case_b", "missing", "case_a"]
    with raises_bundle_error("2 of 3 images") as exit_info:
        _run(CONFIGS, tmp_path, tmp_path / "out", SoftmaxEnsemble(_pointwise(4.0), _pointwise(2.0)),
             case_list="pool.list")  # fmt: skip
    assert f"{tmp_path / 'missing' / 'mri_norm2.h5'}: file not found" in str(exit_info[0])
    rows = _read(tmp_path / "out" / "ranking.csv")
    assert sorted(r["scan"] for r in rows) == ["case_a", "case_b"]
    assert {r["foreground_ml"] for r in rows} == {"n/a"}  # h5 files carry no voxel size
    for row in rows:
        assert float(row["disagreement"]) == pytest.approx(_expected(cases[row["scan"]])[0], rel=1e-4)
    (tmp_path / "twice.list").write_text("case_a\ncase_a\n")
    with pytest.raises(DatasetError, match="twice.list: cases listed more than once"):
        scan_datalist(str(tmp_path), "twice.list")


@pytest.mark.parametrize("inputs", ["empty folder", "no such folder", "listed twice"])
def test_rank_without_scans_stops_with_one_line(tmp_path, inputs):
    dataset, override = tmp_path / "scans", {}
    if inputs != "no such folder":
        dataset.mkdir()
    if inputs == "listed twice":
        (dataset / "pool.list").write_text("case_a\ncase_a\n")
        override["case_list"] = "pool.list"
    with raises_bundle_error() as exit_info:
        _run(CONFIGS, dataset, tmp_path / "out", SoftmaxEnsemble(_pointwise(4.0), _pointwise(2.0)), **override)
    lines = str(exit_info[0]).splitlines()
    assert lines[0] == "Cannot rank:" and len(lines) == 2
    assert lines[1].startswith(f"  {dataset}") and not (tmp_path / "out" / "ranking.csv").exists()
