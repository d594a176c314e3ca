"""The inference rewrite (BatchNorm folding, channels-last weights): same outputs, no norms left, wired into the
inference and evaluation configs."""

import copy

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser, ConfigWorkflow
from torch import nn

from bundle.engine.handlers import OptimizeNetworkHandler
from bundle.inference.optimization import fuse_batchnorm, optimize_for_inference
from bundle.networks.peer import DeepSupervisedVNet
from bundle.networks.subnets import ResNet34Seg, SoftmaxEnsemble, VNetSeg
from tests.conftest import REPO_ROOT


def trained_looking(net):
    """``net`` in eval mode with non-trivial BatchNorm statistics and affine parameters (fresh ones are 0/1)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm3d):
                size = module.num_features
                module.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(size, generator=generator) * 0.4 - 0.2)
    return net.eval()


def count_norms(net):
    return sum(isinstance(m, nn.BatchNorm3d) for m in net.modules())


def test_fused_conv_norm_by_hand():
    conv = nn.Conv3d(1, 1, kernel_size=1)
    norm = nn.BatchNorm3d(1, eps=1.0)
    with torch.no_grad():
        conv.weight.fill_(3.0)
        conv.bias.fill_(1.0)
        norm.running_mean.fill_(4.0)
        norm.running_var.fill_(3.0)
        norm.weight.fill_(0.5)
        norm.bias.fill_(0.25)
    block = nn.Sequential(conv, norm).eval()
    assert fuse_batchnorm(block) == 1
    assert isinstance(block[1], nn.Identity)
    # 0.5 * (3 * 2 + 1 - 4) / sqrt(3 + 1) + 0.25 = 1.0
    assert block(torch.full((1, 1, 1, 1, 1), 2.0)).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("cls", [ResNet34Seg, VNetSeg, DeepSupervisedVNet])
def test_rewrite_keeps_outputs_and_removes_every_norm(cls):
    torch.manual_seed(0)
    net = trained_looking(cls(base_width=4))
    original = copy.deepcopy(net)
    norms = count_norms(net)
    x = torch.randn(2, 1, 32, 32, 32)

    optimize_for_inference(net)

    assert count_norms(net) == 0 and norms > 0  # every norm of these nets follows a convolution
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last_3d) for c in convs if c.kernel_size != (1,) * 3)
    with torch.no_grad():
        expected, actual = original(x), net(x)
    # float rounding only: relative to the logits' scale (up to ~200 for these random deep nets)
    assert (actual - expected).abs().max().item() < 1e-5 * expected.abs().max().item()


def test_fusing_a_training_network_is_refused():
    with pytest.raises(ValueError, match="eval mode"):
        fuse_batchnorm(VNetSeg(base_width=4).train())


def _segment(tmp_path, name, network, **overrides):
    workflow = ConfigWorkflow(
        config_file=str(REPO_ROOT / "configs" / "inference.json"),
        logging_file=False,
        workflow_type="infer",
        dataset_dir=str(tmp_path / "in"),
        output_dir=str(tmp_path / name),
        ckpt_path=str(tmp_path / "model.pt"),
        patch_size=[16, 16, 16],
        sw_strides=[8, 8, 8],
        network_def=network,
        base_width=4,
        save_probabilities=True,
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    return np.asarray(nib.load(str(tmp_path / name / "probabilities" / "case.nii.gz")).dataobj)


def test_inference_config_applies_the_rewrite_with_the_same_probabilities(tmp_path):
    torch.manual_seed(0)
    ensemble = trained_looking(SoftmaxEnsemble(ResNet34Seg(base_width=4), VNetSeg(base_width=4)))
    torch.save(ensemble.state_dict(), tmp_path / "model.pt")
    (tmp_path / "in").mkdir()
    image = np.random.default_rng(0).normal(size=(24, 20, 18)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "in" / "case.nii.gz"))

    plain_network, fast_network = copy.deepcopy(ensemble), copy.deepcopy(ensemble)
    plain = _segment(tmp_path, "plain", plain_network, optimize_network=False, precision="fp32")
    fast = _segment(tmp_path, "fast", fast_network, precision="fp32")  # the rewrite alone; bf16: test_precision.py

    assert count_norms(plain_network) > 0 and count_norms(fast_network) == 0
    np.testing.assert_allclose(fast, plain, atol=1e-4)
    assert np.abs(plain[..., 1] - 0.5).max() > 0.01  # not a degenerate constant output


def test_evaluate_overlay_rewrites_after_loading():
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "configs" / "train.json"), str(REPO_ROOT / "configs" / "evaluate.json")])
    handlers = parser["validate#handlers"]
    targets = [h["_target_"] for h in handlers]
    assert targets.index("CheckpointLoader") < targets.index("bundle.engine.handlers.OptimizeNetworkHandler")

    network = trained_looking(VNetSeg(base_width=4))
    engine = Engine(lambda engine, batch: None)
    OptimizeNetworkHandler(network).attach(engine)
    assert count_norms(network) > 0
    engine.run([0])
    assert count_norms(network) == 0

    untouched = trained_looking(VNetSeg(base_width=4))
    engine = Engine(lambda engine, batch: None)
    OptimizeNetworkHandler(untouched, enabled=False).attach(engine)
    engine.run([0])
    assert count_norms(untouched) > 0
