"""Shared helpers of the inference tests: a pointwise ensemble whose masks are known exactly, a synthetic scan, a
NIfTI writer with chosen header codes, and ``configs/inference.json`` as a workflow."""

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigWorkflow
from torch import nn

from bundle.networks.subnets import SoftmaxEnsemble
from tests.conftest import REPO_ROOT

CONFIG = str(REPO_ROOT / "configs" / "inference.json")
FAST_CONFIG = str(REPO_ROOT / "configs" / "inference_fast.json")

#: a permuted, flipped, anisotropic affine: Orientationd(RAS) must permute and flip, Invertd must undo it.
AFFINE = np.array([[0.0, 0.0, -2.0, 10.0], [1.5, 0.0, 0.0, -5.0], [0.0, -1.0, 0.0, 3.0], [0.0, 0.0, 0.0, 1.0]])
SHAPE = (20, 14, 9)


def pointwise_ensemble():
    """The real ensemble over two 1x1x1 convolutions with logits (0, 4x) and (0, 2x): foreground iff x > 0."""
    subnets = []
    for gain in (4.0, 2.0):
        conv = nn.Conv3d(1, 2, kernel_size=1)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([0.0, gain]).view(2, 1, 1, 1, 1))
            conv.bias.zero_()
        subnets.append(conv)
    return SoftmaxEnsemble(*subnets)


def synthetic_image():
    """An off-centre bright box (value 100) on [0, 1) noise: after z-scoring, x > 0 exactly on the box."""
    rng = np.random.default_rng(0)
    image = rng.random(SHAPE).astype(np.float32)
    image[2:9, 3:12, 1:4] = 100.0
    return image


def write_nifti(path, array, affine=AFFINE):
    image = nib.Nifti1Image(array, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=2)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))
    return str(path)


def inference_workflow(dataset_dir, output_dir, **override):
    settings = dict(ckpt_path=None, patch_size=[8, 8, 8], sw_strides=[3, 5, 2], network_def=pointwise_ensemble())
    settings.update(override)
    return ConfigWorkflow(
        config_file=CONFIG,
        logging_file=False,
        workflow_type="infer",
        dataset_dir=str(dataset_dir),
        output_dir=str(output_dir),
        **settings,
    )
