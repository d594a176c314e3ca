"""Datalists, readers, checks and the synthetic default dataset."""

import json
import os

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from bundle.data.datalists import DatasetError, build_datalists, check_items
from bundle.data.synthetic import ensure_synthetic_dataset
from bundle.data.transforms import preprocessing, training_transforms
from tests.conftest import LA_DIR


def _write_la_case(root, case, shape=(40, 36, 24), keys=("image", "label")):
    os.makedirs(root / case, exist_ok=True)
    rng = np.random.default_rng(len(case))
    with h5py.File(root / case / "mri_norm2.h5", "w") as handle:
        if "image" in keys:
            handle["image"] = rng.standard_normal(shape).astype(np.float32)
        if "label" in keys:
            handle["label"] = (rng.random(shape) > 0.7).astype(np.uint8)


@pytest.fixture
def la_root(tmp_path):
    cases = [f"case{i}" for i in range(6)]
    for case in cases:
        _write_la_case(tmp_path, case)
    (tmp_path / "train.list").write_text("\n".join(cases) + "\n")
    (tmp_path / "val.list").write_text("case5\n")
    return tmp_path


def test_la_split_first_k_labeled_rest_unlabeled_without_labels(la_root):
    lists = build_datalists(str(la_root), num_labeled=2, val_list="val.list")
    assert [os.path.basename(os.path.dirname(i["image"])) for i in lists["labeled"]] == ["case0", "case1"]
    assert [os.path.basename(os.path.dirname(i["image"])) for i in lists["unlabeled"]] == [
        "case2",
        "case3",
        "case4",
        "case5",
    ]
    assert all(set(item) == {"image"} for item in lists["unlabeled"])
    assert all(set(item) == {"image", "label"} for item in lists["labeled"])
    assert len(lists["validation"]) == 1


def test_h5_reader_reads_image_and_label(la_root):
    lists = build_datalists(str(la_root), num_labeled=1)
    item = preprocessing(["image", "label"])(lists["labeled"][0])
    with h5py.File(lists["labeled"][0]["image"]) as handle:
        raw, label = handle["image"][()], handle["label"][()]
    assert item["image"].shape == (1, *raw.shape)
    expected = (raw - raw.mean()) / raw.std()
    np.testing.assert_allclose(item["image"][0].numpy(), expected, atol=1e-4)
    np.testing.assert_array_equal(item["label"][0].numpy(), label)


def test_training_transforms_pad_small_volume_to_patch(la_root):
    lists = build_datalists(str(la_root), num_labeled=1)
    out = training_transforms(["image", "label"], patch_size=[48, 32, 32])(lists["labeled"][0])
    assert out["image"].shape == (1, 48, 32, 32) and out["label"].shape == (1, 48, 32, 32)
    assert isinstance(out["image"], torch.Tensor)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda root: (root / "train.list").write_text("case0\nmissing_case\n"), "missing_case"),
        (lambda root: _write_la_case(root, "case0", keys=("image",)), "no dataset 'label'"),
    ],
)
def test_bad_la_input_is_named(la_root, mutate, message):
    mutate(la_root)
    with pytest.raises(DatasetError, match=message):
        build_datalists(str(la_root), num_labeled=1)


def test_num_labeled_too_large_and_no_unlabeled(la_root):
    with pytest.raises(DatasetError, match="num_labeled=7 but only 6"):
        build_datalists(str(la_root), num_labeled=7)
    with pytest.raises(DatasetError, match="no unlabeled items"):
        build_datalists(str(la_root), num_labeled=6)
    assert len(build_datalists(str(la_root), num_labeled=6, require_unlabeled=False)["labeled"]) == 6


def test_missing_dataset_dir(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        build_datalists(str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="no dataset found"):
        build_datalists(str(tmp_path))


def test_nifti_shape_mismatch_and_non_3d_are_named(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 6), np.uint8), np.eye(4)), tmp_path / "b.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), tmp_path / "c.nii.gz")
    with pytest.raises(DatasetError, match="b.nii.gz: label shape"):
        check_items([{"image": str(tmp_path / "a.nii.gz"), "label": str(tmp_path / "b.nii.gz")}])
    with pytest.raises(DatasetError, match="c.nii.gz: image shape"):
        check_items([{"image": str(tmp_path / "c.nii.gz")}])
    (tmp_path / "d.nii.gz").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="d.nii.gz: not a readable image"):
        check_items([{"image": str(tmp_path / "d.nii.gz")}])


def test_msd_dataset_json_items_without_label_are_unlabeled(tmp_path):
    ensure_synthetic_dataset(str(tmp_path / "syn"), num_labeled=2, num_unlabeled=3, num_validation=1, shape=(16,) * 3)
    lists = build_datalists(str(tmp_path / "syn"))
    assert (len(lists["labeled"]), len(lists["unlabeled"]), len(lists["validation"])) == (2, 3, 1)
    lists = build_datalists(str(tmp_path / "syn"), num_labeled=1)
    assert (len(lists["labeled"]), len(lists["unlabeled"])) == (1, 4)


def test_folder_layout(tmp_path):
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / folder).mkdir()
    for name in ("x.nii.gz", "y.nii.gz"):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "imagesTr" / name)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), tmp_path / "labelsTr" / "x.nii.gz")
    lists = build_datalists(str(tmp_path))
    assert [os.path.basename(i["image"]) for i in lists["labeled"]] == ["x.nii.gz"]
    assert lists["unlabeled"] == [{"image": str(tmp_path / "imagesTr" / "y.nii.gz")}]


def test_synthetic_dataset_is_deterministic_and_labels_match_bright_region(tmp_path):
    kwargs = dict(num_labeled=1, num_unlabeled=1, num_validation=0, shape=(24, 24, 16))
    ensure_synthetic_dataset(str(tmp_path / "a"), **kwargs)
    ensure_synthetic_dataset(str(tmp_path / "b"), **kwargs)
    image_a = nib.load(tmp_path / "a" / "imagesTr" / "case_000.nii.gz").get_fdata()
    image_b = nib.load(tmp_path / "b" / "imagesTr" / "case_000.nii.gz").get_fdata()
    np.testing.assert_array_equal(image_a, image_b)
    label = nib.load(tmp_path / "a" / "labelsTr" / "case_000.nii.gz").get_fdata() > 0
    assert 0 < label.mean() < 0.5
    assert image_a[label].mean() > image_a[~label].mean() + 1.0
    spec = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert "label" in spec["training"][0] and "label" not in spec["training"][1]


@pytest.mark.skipif(not LA_DIR.is_dir(), reason="real LA data (../shared/data/LA) not present")
def test_two_real_la_cases_load():
    lists = build_datalists(str(LA_DIR), num_labeled=2)
    assert len(lists["labeled"]) == 2 and len(lists["unlabeled"]) == 78
    for item in lists["labeled"]:
        out = training_transforms(["image", "label"], patch_size=[112, 112, 80])(item)
        assert out["image"].shape == (1, 112, 112, 80)
        assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}
        assert abs(float(preprocessing(["image"])(item)["image"].std()) - 1.0) < 1e-3
