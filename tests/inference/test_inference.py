"""Folder inference: the papers' window grid through the config's inferer, NIfTI round trip, bad files, atomicity."""

import gzip
import itertools
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import Dataset
from monai.inferers import SlidingWindowInferer
from monai.transforms import AsDiscreted, Compose, Invertd, Lambdad
from torch import nn

from bundle.data.datalists import DatasetError
from bundle.data.transforms import preprocessing
from bundle.inference.folder import (
    FolderInference,
    SubnetDisagreement,
    disagreement_map,
    entropy_map,
    image_datalist,
    strides_to_overlap,
    window_starts,
)
from tests.conftest import BRATS_DIR, raises_bundle_error
from tests.inference_helpers import (
    CONFIG,
    FAST_CONFIG,
    SHAPE,
    inference_workflow,
    pointwise_ensemble,
    synthetic_image,
    write_nifti,
)


# ----------------------------------------------------------------------------------------- window grid
@pytest.mark.parametrize(
    "roi, strides",
    [((112, 112, 80), (18, 18, 4)), ((96, 96, 96), (16, 16, 16)), ((96, 96, 96), (64, 64, 64)), ((8, 8, 8), (8, 1, 7))],
)
def test_overlap_gives_exact_monai_interval(roi, strides):
    overlaps = strides_to_overlap(roi, strides)
    assert [int(p * (1 - o)) for p, o in zip(roi, overlaps)] == list(strides)
    assert all(0 <= o < 1 for o in overlaps)


def test_naive_overlap_is_off_by_one_for_pancreas():
    """Why strides_to_overlap exists: MONAI's int(96 * (1 - 80/96)) is 15, not the papers' 16."""
    assert int(96 * (1 - (96 - 16) / 96)) == 15


def test_invalid_strides_rejected():
    with pytest.raises(ValueError, match="stride"):
        strides_to_overlap((96, 96, 96), (16, 0, 16))
    with pytest.raises(ValueError, match="stride"):
        strides_to_overlap((96, 96, 96), (16, 97, 16))


def test_reference_grid_by_hand():
    """S=150, P=112, s=18: n = ceil(38/18) + 1 = 4 windows at 0, 18, 36 and min(54, 38) = 38."""
    assert window_starts((150, 100, 88), (112, 112, 80), (18, 18, 4)) == [[0, 18, 36, 38], [0], [0, 4, 8]]


@pytest.mark.parametrize(
    "image_size, roi, strides",
    [
        ((176, 144, 88), (112, 112, 80), (18, 18, 4)),  # LA
        ((130, 100, 96), (96, 96, 96), (16, 16, 16)),  # pancreas
        ((240, 240, 155), (96, 96, 96), (64, 64, 64)),  # BraTS
        ((10, 30, 9), (16, 16, 8), (5, 7, 3)),  # an axis smaller than the window is padded
    ],
)
def test_config_inferer_grid_equals_reference_grid(image_size, roi, strides):
    """Feed the config's SlidingWindowInferer an image whose channel c holds 1 + the index along axis c. In a window,
    the smallest non-zero value (zero is the inferer's padding) of channel c on the line along axis c through the
    window centre tells where the window starts on that axis."""
    parser = ConfigParser()
    parser.read_config(CONFIG)
    parser.update({"patch_size": list(roi), "sw_strides": list(strides)})
    inferer = parser.get_parsed_content("inferer")
    starts = []

    def start(window, axis):
        index = [axis] + [size // 2 for size in window.shape[1:]]
        index[axis + 1] = slice(None)
        line = window[tuple(index)]
        return int(line[line > 0].min()) - 1

    def predictor(windows):
        starts.extend(tuple(start(w, axis) for axis in range(3)) for w in windows)
        return torch.zeros((windows.shape[0], 1, *windows.shape[2:]))

    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in image_size], indexing="ij")
    inferer(torch.stack(grids)[None] + 1, predictor)
    assert sorted(starts) == sorted(itertools.product(*window_starts(image_size, roi, strides)))


def test_fast_preset_uses_overlap_half():
    parser = ConfigParser()
    parser.read_config([CONFIG, FAST_CONFIG])
    assert parser.get_parsed_content("inferer").overlap == 0.5


# ------------------------------------------------------------------------------------------- uncertainty
def test_entropy_and_disagreement_values():
    prob = torch.tensor([[0.5, 1.0, 0.2], [0.5, 0.0, 0.8]])[None]  # (N=1, C=2, 3 voxels)
    expected = [np.log(2.0), 0.0, -(0.2 * np.log(0.2) + 0.8 * np.log(0.8))]
    assert entropy_map(prob)[0, 0].tolist() == pytest.approx(expected, abs=1e-6)
    other = torch.tensor([[0.9, 1.0, 0.6], [0.1, 0.0, 0.4]])[None]
    assert disagreement_map(prob, other)[0, 0].tolist() == pytest.approx([0.4, 0.0, 0.4], abs=1e-6)


def test_subnet_disagreement_matches_the_ensemble():
    ensemble = pointwise_ensemble()
    x = torch.linspace(-2, 2, 8).view(1, 1, 2, 2, 2)
    prob, disagreement = SubnetDisagreement(ensemble)(x)
    assert torch.allclose(prob, ensemble(x), atol=1e-7)
    assert torch.allclose(disagreement[:, 0], (torch.sigmoid(4 * x) - torch.sigmoid(2 * x)).abs()[:, 0], atol=1e-6)
    with pytest.raises(ValueError, match="net_a"):
        SubnetDisagreement(nn.Identity())


# ------------------------------------------------------------------------------------------------ inputs
def test_datalist_folder_glob_empty_and_duplicates(tmp_path):
    for name in ("b.nii.gz", "a.nii", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert image_datalist(str(tmp_path)) == [
        {"image": str(tmp_path / n), "case": n.split(".")[0]} for n in ("a.nii", "b.nii.gz")
    ]
    assert image_datalist(str(tmp_path / "b*")) == [{"image": str(tmp_path / "b.nii.gz"), "case": "b"}]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        image_datalist(str(tmp_path / "empty"))
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    with pytest.raises(DatasetError, match="both be written"):
        image_datalist(str(tmp_path))


# ------------------------------------------------------------------------------------- runner, round trip
def test_round_trip_affine_header_shape_and_maps(tmp_path):
    image = synthetic_image()
    (tmp_path / "in").mkdir()
    source = write_nifti(tmp_path / "in" / "case.nii.gz", image)
    workflow = inference_workflow(
        tmp_path / "in", tmp_path / "out", save_probabilities=True, save_uncertainty=True, precision="fp32"
    )  # exact values: bf16 inference is tested in test_precision.py
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()

    reference = nib.load(source)
    names = ("case.nii.gz", "probabilities/case.nii.gz", "entropy/case.nii.gz", "disagreement/case.nii.gz")
    outputs = {name: nib.load(str(tmp_path / "out" / name)) for name in names}
    for name, output in outputs.items():
        assert output.shape[:3] == SHAPE, name
        np.testing.assert_allclose(output.affine, reference.affine, atol=1e-6, err_msg=name)
        for field in ("qform_code", "sform_code", "xyzt_units"):
            assert output.header[field] == reference.header[field], (name, field)
    mask = np.asarray(outputs["case.nii.gz"].dataobj)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, image == 100.0)

    x = (image - image.mean()) / image.std()
    prob_a, prob_b = 1 / (1 + np.exp(-4 * x)), 1 / (1 + np.exp(-2 * x))
    probabilities = np.asarray(outputs["probabilities/case.nii.gz"].dataobj)
    assert probabilities.shape == (*SHAPE, 2)
    np.testing.assert_allclose(probabilities[..., 1], (prob_a + prob_b) / 2, atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(outputs["disagreement/case.nii.gz"].dataobj), abs(prob_a - prob_b), atol=1e-5)
    entropy = -(probabilities * np.log(probabilities)).sum(-1)
    np.testing.assert_allclose(np.asarray(outputs["entropy/case.nii.gz"].dataobj), entropy, atol=1e-5)
    assert sorted(os.listdir(tmp_path / "out")) == [
        "case.nii.gz",
        "disagreement",
        "entropy",
        "manifest.json",
        "probabilities",
    ]


def test_bad_files_are_reported_skipped_and_exit_nonzero(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = write_nifti(folder / "good.nii.gz", synthetic_image())
    (folder / "garbage.nii.gz").write_bytes(os.urandom(500))
    compressed = open(good, "rb").read()
    (folder / "truncated.nii.gz").write_bytes(gzip.compress(gzip.decompress(compressed)[:1000]))
    write_nifti(folder / "flat.nii.gz", np.zeros((20, 14), np.float32), np.eye(4))
    write_nifti(folder / "rgb.nii.gz", np.zeros((20, 14, 9, 3), np.float32), np.eye(4))
    workflow = inference_workflow(folder, tmp_path / "out")
    workflow.initialize()
    with raises_bundle_error() as exit_info:
        workflow.run()
    message = str(exit_info[0])
    assert message.startswith("1 of 5 images segmented")
    for name in ("garbage", "truncated", "flat", "rgb"):
        assert f"{folder / name}.nii.gz: " in message
    assert message.count("is not 3D with 1 channel(s)") == 2 and "could the file be damaged?" in message
    assert sorted(os.listdir(tmp_path / "out")) == ["good.nii.gz", "manifest.json"]


def test_failed_write_leaves_no_partial_output(tmp_path):
    """The mask is written, then the probability map fails: neither may appear under its final name."""
    source = write_nifti(tmp_path / "case.nii.gz", synthetic_image())
    transform = preprocessing(keys=("image",))
    post = Compose(
        [
            Invertd(keys="pred", orig_keys="image", transform=transform, nearest_interp=False),
            Lambdad(keys="pred", func=lambda p: p, overwrite="prob"),
            Lambdad(keys="prob", func=lambda p: "not an image"),
            AsDiscreted(keys="pred", argmax=True),
        ]
    )
    runner = FolderInference(
        dataset=Dataset([{"image": source}], transform=transform),
        network=pointwise_ensemble(),
        inferer=SlidingWindowInferer(roi_size=(8, 8, 8), overlap=0.5),
        postprocessing=post,
        output_dir=str(tmp_path / "out"),
    )
    with raises_bundle_error("0 of 1"):
        runner.run()
    assert os.listdir(tmp_path / "out") == ["manifest.json"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    runner = FolderInference(Dataset([]), pointwise_ensemble(), None, None, str(tmp_path), str(tmp_path / "x.pt"))
    with raises_bundle_error() as info:
        runner.run()
    assert str(info[0]).splitlines() == [
        "Cannot segment:",
        f"  {tmp_path / 'x.pt'}: no trained weights (train first, or set ckpt_path).",
    ]


# ------------------------------------------------------------------------------------------------ real data
@pytest.mark.skipif(not BRATS_DIR.is_dir(), reason="../shared/data/BraTS_demo is not present")
def test_two_real_brats_cases_keep_grid_and_header(tmp_path):
    cases = sorted(p.name for p in BRATS_DIR.iterdir() if p.is_dir())[:2]
    (tmp_path / "in").mkdir()
    for case in cases:
        os.symlink(BRATS_DIR / case / "FLAIR.nii.gz", tmp_path / "in" / f"{case}.nii.gz")
    workflow = inference_workflow(
        tmp_path / "in", tmp_path / "out", patch_size=[128, 128, 80], sw_strides=[128, 128, 80]
    )
    workflow.initialize()
    workflow.run()
    for case in cases:
        reference, output = nib.load(str(tmp_path / "in" / f"{case}.nii.gz")), nib.load(
            str(tmp_path / "out" / f"{case}.nii.gz")
        )
        assert output.shape == reference.shape == (240, 240, 155)
        np.testing.assert_allclose(output.affine, reference.affine, atol=1e-6)
        assert output.header["qform_code"] == reference.header["qform_code"]
        assert output.header["sform_code"] == reference.header["sform_code"]
        flair = np.asarray(reference.dataobj, dtype=np.float32)
        np.testing.assert_array_equal(np.asarray(output.dataobj), flair > flair.mean())
