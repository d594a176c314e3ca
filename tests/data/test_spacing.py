"""Voxel spacing (median, explicit, native) and intensity (z-score, CT) settings, and the spacing round trip."""

import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import Dataset
from monai.inferers import SlidingWindowInferer
from monai.transforms import AsDiscreted, Compose, Invertd

from bundle.config.errors import BundleError
from bundle.data.datalists import build_datalists
from bundle.data.settings import median_spacing, ras_spacing, resolve_data_settings
from bundle.data.synthetic import make_nnunet_dataset
from bundle.data.transforms import preprocessing
from bundle.inference.folder import FolderInference
from bundle.networks.subnets import SoftmaxEnsemble


@pytest.fixture(scope="module")
def nnunet_root(tmp_path_factory):
    return make_nnunet_dataset(str(tmp_path_factory.mktemp("spacing") / "Dataset002_Aniso"), shape=(24, 24, 8))


def _save(path, array, affine):
    nib.save(nib.Nifti1Image(array.astype(np.float32), affine), str(path))
    return str(path)


def test_spacing_is_read_along_ras_axes(tmp_path):
    affine = np.array([[0, 0, 5.0, 0], [0, -0.7, 0, 0], [0.8, 0, 0, 0], [0, 0, 0, 1]])  # voxel axes (S, A, R)
    path = _save(tmp_path / "a.nii.gz", np.zeros((4, 5, 6)), affine)
    assert ras_spacing(path) == pytest.approx([5.0, 0.7, 0.8])
    other = _save(tmp_path / "b.nii.gz", np.zeros((4, 5, 6)), np.diag([1.0, 1.0, 1.0, 1]))
    third = _save(tmp_path / "c.nii.gz", np.zeros((4, 5, 6)), np.diag([2.0, 0.5, 3.0, 1]))
    items = [{"image": p} for p in (path, other, third)]
    assert median_spacing(items) == pytest.approx([2.0, 0.7, 1.0])
    assert median_spacing(items + [{"image": str(tmp_path / "case" / "mri_norm2.h5")}]) is None  # h5: native grid


def test_median_explicit_and_native_spacing(nnunet_root):
    labeled = build_datalists(nnunet_root, in_channels=2)["labeled"]
    assert resolve_data_settings(labeled) == {"spacing": [0.7, 0.7, 5.0], "intensity": {"scheme": "zscore"}}
    assert resolve_data_settings(labeled, [1, 1, 2])["spacing"] == [1.0, 1.0, 2.0]
    assert resolve_data_settings(labeled, None)["spacing"] is None
    for bad in ("mean", [1, 1], [1, 0, 1]):
        with pytest.raises(BundleError, match="spacing: expected"):
            resolve_data_settings(labeled, bad)
    with pytest.raises(BundleError, match="intensity: expected one of"):
        resolve_data_settings(labeled, None, "minmax")


def test_ct_statistics_clip_and_normalise(tmp_path):
    values = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)  # foreground: x < 5 (values 0 .. 499)
    label = np.zeros((10, 10, 10), np.uint8)
    label[:5] = 1
    image_path, label_path = _save(tmp_path / "ct.nii.gz", values, np.eye(4)), _save(
        tmp_path / "l.nii.gz", label, np.eye(4)
    )
    item = {"image": image_path, "label": label_path}
    settings = resolve_data_settings([item], None, "ct")["intensity"]
    foreground = values[:5].ravel()
    assert settings["lower"] == pytest.approx([np.percentile(foreground, 0.5)])
    assert settings["upper"] == pytest.approx([np.percentile(foreground, 99.5)])
    assert settings["mean"] == pytest.approx([foreground.mean()]) and settings["std"] == pytest.approx(
        [foreground.std()]
    )
    image = preprocessing(keys=("image",), intensity=settings)({"image": item["image"]})["image"]
    expected = (np.clip(values, settings["lower"][0], settings["upper"][0]) - foreground.mean()) / foreground.std()
    assert np.allclose(image[0].numpy(), expected, atol=1e-4)


def test_resampled_prediction_lands_on_the_input_grid(nnunet_root, tmp_path):
    """0.7 x 0.7 x 5 mm input segmented at 1.4 x 1.4 x 2.5 mm: the mask has the input's shape and affine, and the
    resampled grid is the expected one."""
    image = np.random.default_rng(0).random((24, 24, 8))
    image[6:18, 4:16, 2:6] = 100.0  # z-score > 0 exactly on the box
    affine = nib.load(os.path.join(nnunet_root, "imagesTs", "case_006_0000.nii.gz")).affine
    source = _save(tmp_path / "case_006_0000.nii.gz", image, affine)
    transform = preprocessing(keys=("image",), spacing=[1.4, 1.4, 2.5])
    resampled = transform({"image": source})["image"]
    assert tuple(resampled.shape[1:]) == (12, 12, 15)
    assert np.allclose(np.diag(resampled.affine.numpy())[:3], [1.4, 1.4, 2.5])
    conv = torch.nn.Conv3d(1, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.0, 4.0]).view(2, 1, 1, 1, 1))
        conv.bias.zero_()
    runner = FolderInference(
        dataset=Dataset([{"image": source, "case": "case_006"}], transform=transform),
        network=SoftmaxEnsemble(conv, conv),
        inferer=SlidingWindowInferer(roi_size=(8, 8, 8)),
        postprocessing=Compose(
            [Invertd(keys="pred", orig_keys="image", transform=transform), AsDiscreted(keys="pred", argmax=True)]
        ),
        output_dir=str(tmp_path / "out"),
    )
    runner.run()
    mask, image = nib.load(tmp_path / "out" / "case_006.nii.gz"), nib.load(source)
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    box = np.zeros(image.shape, bool)
    box[6:18, 4:16, 2:6] = True
    assert np.array_equal(np.asarray(mask.dataobj) > 0, box)
