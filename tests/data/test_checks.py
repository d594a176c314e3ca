"""Checks before training: one test per bad-input kind (NIfTI and LA h5 layouts), all problems in one report,
settings of the wrong type, unwritable output folders, the check-only command, and bad files at inference."""

import os
import subprocess
import sys

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from bundle.config.settings import check_settings
from bundle.data.checks import (
    CheckedCacheDataset,
    check_dataset,
    check_writable,
    datalists_or_exit,
    report_data_problems,
)
from bundle.data.datalists import build_datalists
from bundle.data.transforms import training_transforms
from bundle.inference.folder import INPUT_FORMATS as FORMATS
from bundle.inference.folder import FolderInference
from tests.conftest import REPO_ROOT, raises_bundle_error
from tests.inference_helpers import inference_workflow, pointwise_ensemble, synthetic_image, write_nifti

SHAPE = (12, 10, 8)
AFFINE = np.diag([1.0, 1.0, 1.5, 1.0])


def _volumes(seed=0):
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.uint8)
    label[3:8, 3:7, 2:6] = 1
    return rng.standard_normal(SHAPE).astype(np.float32) + label, label


def _truncate(path):
    """Keep the header and the first half of the data: the header still reads, the voxels do not."""
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _nifti_root(tmp_path, breakage=None):
    """A folder dataset (imagesTr/labelsTr) of 4 labeled + 2 unlabeled cases; ``breakage(case) -> (image, label,
    label_affine)`` changes what a case writes."""
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / folder).mkdir()
    for index in range(6):
        image, label = _volumes(index)
        label_affine = AFFINE
        if breakage is not None:
            image, label, label_affine = breakage(index, image, label, label_affine)
        nib.save(nib.Nifti1Image(image, AFFINE), tmp_path / "imagesTr" / f"c{index}.nii.gz")
        if index < 4:
            nib.save(nib.Nifti1Image(label, label_affine), tmp_path / "labelsTr" / f"c{index}.nii.gz")
    return tmp_path


def _la_root(tmp_path, breakage=None):
    """An LA layout (``<case>/mri_norm2.h5`` + ``train.list``) of 6 cases."""
    cases = [f"case{i}" for i in range(6)]
    for index, case in enumerate(cases):
        image, label = _volumes(index)
        if breakage is not None:
            image, label, _ = breakage(index, image, label, None)
        os.makedirs(tmp_path / case)
        with h5py.File(tmp_path / case / "mri_norm2.h5", "w") as handle:
            handle["image"], handle["label"] = image, label
    (tmp_path / "train.list").write_text("\n".join(cases) + "\n")
    return tmp_path


def _report(root, num_labeled=4, out_channels=2):
    """Build the datalists and the checked datasets as train.json does; the report raised by the data check."""
    lists = build_datalists(str(root), num_labeled=num_labeled)
    datasets = [
        CheckedCacheDataset(
            lists["labeled"], training_transforms(["image", "label"], [8, 8, 8], num_classes=out_channels)
        ),
        CheckedCacheDataset(
            lists["unlabeled"], training_transforms(["image"], [8, 8, 8], num_classes=out_channels), progress=False
        ),
    ]
    with raises_bundle_error() as info:
        report_data_problems(datasets)
    return str(info[0])


def _nan_image(index, image, label, affine):
    if index == 1:
        image[2, 3, 4] = np.nan
        image[0, 0, 0] = np.inf
    return image, label, affine


def _label_seven(index, image, label, affine):
    if index == 2:
        label[0, 0, 0] = 7  # a corner that a random crop may never hit
    return image, label, affine


def _flipped_label_affine(index, image, label, affine):
    return image, label, (np.diag([-1.0, 1.0, 1.5, 1.0]) if index == 3 else affine)


@pytest.mark.parametrize("layout", ["nifti", "h5"])
@pytest.mark.parametrize(
    "breakage, nifti_file, h5_case, message",
    [
        (_nan_image, "imagesTr/c1.nii.gz", "case1", "2 non-finite voxel(s) (NaN or Inf) in the image"),
        (_label_seven, "labelsTr/c2.nii.gz", "case2", "label values [7.0] outside [0, 2) (out_channels=2)"),
    ],
)
def test_bad_voxels_are_named(tmp_path, layout, breakage, nifti_file, h5_case, message):
    root = (_nifti_root if layout == "nifti" else _la_root)(tmp_path, breakage)
    path = root / nifti_file if layout == "nifti" else root / h5_case / "mri_norm2.h5"
    assert _report(root).splitlines()[1:] == [f"  {path}: {message}"]


def test_label_affine_differing_from_image_is_named(tmp_path):
    root = _nifti_root(tmp_path, _flipped_label_affine)
    lines = _report(root).splitlines()[1:]
    assert len(lines) == 1
    assert lines[0].startswith(f"  {root / 'labelsTr' / 'c3.nii.gz'}: label affine differs from the image's")
    assert "by up to 2 " in lines[0]


def test_label_without_image_is_named(tmp_path):
    root = _nifti_root(tmp_path)
    nib.save(nib.Nifti1Image(_volumes(6)[1], AFFINE), root / "labelsTr" / "c6.nii.gz")  # e.g. a misspelt name
    with raises_bundle_error() as info:
        datalists_or_exit(dataset_dir=str(root), num_labeled=4)
    assert str(info[0]).splitlines() == [
        "Data check failed:",
        f"  {root / 'labelsTr' / 'c6.nii.gz'}: label has no image of the same name in {root / 'imagesTr'}.",
    ]


@pytest.mark.parametrize("layout", ["nifti", "h5"])
def test_truncated_file_with_intact_header_is_named(tmp_path, layout):
    root = (_nifti_root if layout == "nifti" else _la_root)(tmp_path)
    path = root / "imagesTr" / "c5.nii.gz" if layout == "nifti" else root / "case5" / "mri_norm2.h5"
    _truncate(path)
    if layout == "nifti":
        assert nib.load(path).shape == SHAPE  # the header check alone passes
        lines = _report(root).splitlines()[1:]
        assert len(lines) == 1 and lines[0].startswith(f"  {path}: cannot be read to the end (")
    else:  # h5 keeps its index at the end of the file: the header check already names it
        with pytest.raises(Exception, match=f"{path}: not a readable h5 file"):
            build_datalists(str(root), num_labeled=4)


def test_every_problem_of_every_dataset_in_one_report(tmp_path):
    def several(index, image, label, affine):
        image, label, affine = _nan_image(index, image, label, affine)
        image, label, affine = _label_seven(index, image, label, affine)
        if index == 4:  # unlabeled
            image[:] = np.nan
        return image, label, affine

    root = _nifti_root(tmp_path, several)
    report = _report(root)
    assert report.splitlines() == [
        "Data check failed: 3 problem(s); nothing was trained. Fix or remove these files (check_data false skips the "
        "voxel checks):",
        f"  {root / 'imagesTr' / 'c1.nii.gz'}: 2 non-finite voxel(s) (NaN or Inf) in the image",
        f"  {root / 'labelsTr' / 'c2.nii.gz'}: label values [7.0] outside [0, 2) (out_channels=2)",
        f"  {root / 'imagesTr' / 'c4.nii.gz'}: 960 non-finite voxel(s) (NaN or Inf) in the image",
    ]


def test_checked_dataset_caches_the_checked_read(tmp_path, monkeypatch):
    root = _nifti_root(tmp_path)
    lists = build_datalists(str(root), num_labeled=4)
    reads = []
    original = nib.load
    monkeypatch.setattr(nib, "load", lambda path, *a, **k: reads.append(str(path)) or original(path, *a, **k))
    dataset = CheckedCacheDataset(
        lists["labeled"], training_transforms(["image", "label"], [8, 8, 8], num_classes=2), progress=False
    )
    for _ in range(3):
        assert dataset[0]["image"].shape == (1, 8, 8, 8)
    assert len(reads) == 8 and dataset.problems == []  # 4 images + 4 labels, each read once
    report_data_problems([dataset])  # nothing to report: returns


def test_check_data_false_skips_the_voxel_checks(tmp_path):
    root = _nifti_root(tmp_path, _label_seven)
    lists = build_datalists(str(root), num_labeled=4)
    transform = training_transforms(["image", "label"], [8, 8, 8], num_classes=2, check=False)
    dataset = CheckedCacheDataset(lists["labeled"], transform, check=False, progress=False)
    assert dataset.problems == [] and float(dataset._cache[2]["label"].max()) == 7.0


def test_check_data_command(tmp_path):
    root = _la_root(tmp_path, _label_seven)
    command = [sys.executable, "scripts/check_data.py", str(root), "--out_channels", "2"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"  {root / 'case2' / 'mri_norm2.h5'}: label values [7.0] outside [0, 2) (out_channels=2)"
    )
    assert check_dataset(str(root), out_channels=8) == 6  # 7 is a valid class of an 8-class problem


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"max_iterations": "abc"}, "max_iterations: expected an integer, got 'abc' (str)"),
        (
            {"train#preprocessing#augment": "maybe"},
            "train#preprocessing#augment: expected a boolean (true/false, True/False, 1/0 or yes/no), got 'maybe'",
        ),
        (
            {"patch_size": [96, "a", 96]},
            "patch_size: expected a list of integers, e.g. [96,96,96], got [96, 'a', 96] (list)",
        ),
        ({"optimizer#lr": True}, "optimizer#lr: expected a number, got True (bool)"),
        ({"datalists#val_list": 3}, "datalists#val_list: expected a path or null, got 3 (int)"),
        (
            {"patch_size": [96, 96, 20]},
            "patch_size: expected sizes divisible by 16 (the networks' down-sampling), got [96, 96, 20]",
        ),
    ],
)
def test_settings_of_the_wrong_type_name_the_key(settings, message):
    with raises_bundle_error() as info:
        check_settings(settings)
    assert str(info[0]).splitlines()[1:] == [f"  {message}"]


def test_good_settings_pass():
    check_settings(
        {
            "max_iterations": 5,
            "optimizer#lr": 1,
            "train#preprocessing#augment": False,
            "patch_size": [16, 32, 16],
            "resume_from": None,
        }
    )


def test_unwritable_output_folder_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    check_writable([str(tmp_path / "out")])
    assert os.listdir(tmp_path / "out") == []  # the probe file is removed
    with raises_bundle_error() as info:
        check_writable([str(tmp_path / "out"), str(tmp_path / "file" / "models")])
    assert str(info[0]).splitlines()[1].startswith(f"  {tmp_path / 'file' / 'models'}: not writable")


def test_inference_reports_non_finite_input_and_removes_stale_staging(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_nifti(folder / "good.nii.gz", synthetic_image())
    image = synthetic_image()
    image[1, 1, 1] = np.nan
    bad = write_nifti(folder / "nan.nii.gz", image)
    (tmp_path / "out" / ".partial-stale" / "pred").mkdir(parents=True)
    workflow = inference_workflow(folder, tmp_path / "out")
    workflow.initialize()
    with raises_bundle_error() as info:
        workflow.run()
    lines = str(info[0]).splitlines()
    assert lines[0] == f"1 of 2 images segmented into {tmp_path / 'out'}; 1 failed:"
    assert lines[1:] == [f"  {bad}: DatasetError: {bad}: 1 non-finite voxel(s) (NaN or Inf) in the image"]
    assert sorted(os.listdir(tmp_path / "out")) == ["good.nii.gz", "manifest.json"]


@pytest.mark.parametrize("damage", ["truncated", "other network", "resume checkpoint"])
def test_inference_weights_that_cannot_be_loaded_are_named(tmp_path, damage):
    path = tmp_path / "model.pt"
    if damage == "resume checkpoint":
        torch.save({"method": pointwise_ensemble().state_dict(), "optimizer": {}}, path)
    else:
        torch.save((pointwise_ensemble() if damage == "truncated" else torch.nn.Linear(2, 2)).state_dict(), path)
    if damage == "truncated":
        _truncate(path)
    runner = FolderInference([], pointwise_ensemble(), None, None, str(tmp_path / "out"), str(path))
    with raises_bundle_error() as info:
        runner.run()
    lines = str(info[0]).splitlines()
    assert len(lines) == 2 and lines[0] == "Cannot segment:"
    if damage == "truncated":
        assert lines[1].startswith(f"  {path}: not a complete weights file, truncated or corrupt (")
    else:
        assert lines[1].startswith(
            f"  {path}: the weights do not fit the network; pass the model's in_channels, out_channels, base_width "
            "and norm as for training, and give the model.pt that training writes (Error(s) in loading state_dict"
        )
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("folder", ["empty", "missing"])
def test_inference_without_images_is_one_line(tmp_path, folder):
    if folder == "empty":
        (tmp_path / folder).mkdir()
    where = "folder" if folder == "empty" else "pattern (no such folder)"
    workflow = inference_workflow(tmp_path / folder, tmp_path / "out")
    workflow.initialize()
    with raises_bundle_error() as info:
        workflow.run()
    assert str(info[0]).splitlines() == [
        "Cannot segment:",
        f"  {tmp_path / folder}: no images found in this {where} {FORMATS}.",
    ]
    assert not (tmp_path / "out").exists()
