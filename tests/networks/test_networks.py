"""Subnets A/B and the softmax ensemble: parameter counts, shapes, init, shape checks and TorchScript."""

import math

import pytest
import torch
from torch import nn

from bundle.networks.described import network_config
from bundle.networks.peer import DeepSupervisedVNet, ProjectionVNet
from bundle.networks.subnets import ResNet34Seg, SoftmaxEnsemble, VNetSeg


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("cls, expected", [(ResNet34Seg, 17_930_354), (VNetSeg, 9_448_866)])
def test_parameter_count_matches_reference(cls, expected):
    assert count_parameters(cls(in_channels=1, out_channels=2, base_width=16)) == expected


@pytest.mark.parametrize("cls", [ResNet34Seg, VNetSeg])
@pytest.mark.parametrize("num_classes", [2, 3])
def test_output_and_feature_shapes(cls, num_classes):
    torch.manual_seed(0)
    net = cls(in_channels=1, out_channels=num_classes, base_width=4)
    x = torch.randn(2, 1, 16, 16, 32)
    logits, features = net.forward_features(x)
    assert net(x).shape == (2, num_classes, 16, 16, 32)
    assert logits.shape == (2, num_classes, 16, 16, 32)
    assert features.shape == (2, 4, 16, 16, 32)


@pytest.mark.parametrize("cls", [ResNet34Seg, VNetSeg])
def test_two_input_channels(cls):
    net = cls(in_channels=2, out_channels=2, base_width=4).eval()
    assert net(torch.randn(1, 2, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


@pytest.mark.parametrize("cls", [ResNet34Seg, VNetSeg])
@pytest.mark.parametrize("norm", ["instance", ("group", {"num_groups": 2})])
def test_other_norms(cls, norm):
    net = cls(base_width=4, norm=norm)
    kinds = {type(m) for m in net.modules()}
    assert (nn.InstanceNorm3d in kinds) != (nn.GroupNorm in kinds)
    assert nn.BatchNorm3d not in kinds
    out = net(torch.randn(1, 1, 32, 32, 32))
    assert out.shape == (1, 2, 32, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("cls", [ResNet34Seg, VNetSeg])
def test_indivisible_shape_raises_value_error(cls):
    net = cls(base_width=4)
    with pytest.raises(ValueError, match=r"\[1, 1, 33, 32, 32\]"):
        net(torch.randn(1, 1, 33, 32, 32))
    with pytest.raises(ValueError, match="5D"):
        net(torch.randn(1, 16, 16, 16))


def test_out_channels_below_two_rejected():
    with pytest.raises(ValueError, match="out_channels"):
        VNetSeg(out_channels=1)


@pytest.mark.parametrize("cls", [ResNet34Seg, VNetSeg])
def test_initialisation(cls):
    torch.manual_seed(0)
    net = cls(base_width=8)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm3d)]
    assert norms and all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d) and m.weight.numel() > 50_000]
    for conv in convs:  # Kaiming normal (fan_in, gain sqrt(2))
        fan_in = conv.weight[0].numel()
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.05)


@pytest.mark.parametrize("cls", [ResNet34Seg, VNetSeg])
def test_torch_default_initialisation_is_kept_and_recorded(cls):
    """``weight_init="torch_default"`` keeps PyTorch's Kaiming-uniform (a = sqrt(5)): std 1 / sqrt(3 fan_in), about
    sqrt(6) times smaller than Kaiming-normal; the choice is part of the network's recorded config."""
    torch.manual_seed(0)
    net = cls(base_width=8, weight_init="torch_default")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d) and m.weight.numel() > 50_000]
    assert convs
    for conv in convs:
        fan_in = conv.weight[0].numel()
        assert conv.weight.std().item() == pytest.approx(1.0 / math.sqrt(3.0 * fan_in), rel=0.05)
        assert conv.weight.abs().max().item() <= 1.0 / math.sqrt(fan_in)
    assert network_config(net)["weight_init"] == "torch_default"
    with pytest.raises(ValueError, match="weight_init must be one of"):
        cls(base_width=4, weight_init="xavier")


@pytest.mark.parametrize("cls, added", [(DeepSupervisedVNet, "ds_heads"), (ProjectionVNet, "projection")])
def test_peer_networks_initialise_their_added_layers_as_the_backbone(cls, added):
    """The deep-supervision heads (DuCiSC) and the projection head (DyCON) follow ``weight_init``: Kaiming-normal
    with it, PyTorch's own draw (bounded by 1 / sqrt(fan_in)) with ``torch_default``."""
    for weight_init in ("kaiming_normal", "torch_default"):
        torch.manual_seed(0)
        net = cls(base_width=8, weight_init=weight_init)
        convs = [m for m in getattr(net, added).modules() if isinstance(m, nn.Conv3d)]
        assert convs
        bounded = [conv.weight.abs().max().item() <= 1.0 / math.sqrt(conv.weight[0].numel()) for conv in convs]
        assert all(bounded) == (weight_init == "torch_default")


def test_resnet_convs_have_no_bias_and_no_encoder_dropout():
    net = ResNet34Seg(base_width=4)
    assert all(m.bias is None for m in net.encoder.modules() if isinstance(m, nn.Conv3d))
    assert not any(isinstance(m, nn.Dropout3d) for m in net.encoder.modules())
    assert all(m.bias is not None for m in net.decoder.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)))


def test_vnet_bottleneck_dropout_only_in_training():
    torch.manual_seed(0)
    net = VNetSeg(base_width=4, dropout=0.5)
    x = torch.randn(2, 1, 16, 16, 16)
    net.train()
    features = net.forward_features(x)[1]
    dropped = (features.abs().sum(dim=(2, 3, 4)) == 0).sum().item()
    assert dropped > 0  # Dropout3d zeroes whole channels of x9
    net.eval()
    assert torch.equal(net(x), net(x))


def test_ensemble_is_mean_of_softmaxes():
    torch.manual_seed(0)
    net_a, net_b = ResNet34Seg(out_channels=3, base_width=4).eval(), VNetSeg(out_channels=3, base_width=4).eval()
    ensemble = SoftmaxEnsemble(net_a, net_b)
    x = torch.randn(1, 1, 16, 16, 16)
    probs = ensemble(x)
    expected = (torch.softmax(net_a(x), 1) + torch.softmax(net_b(x), 1)) / 2
    assert torch.allclose(probs, expected)
    assert torch.allclose(probs.sum(dim=1), torch.ones(1, 16, 16, 16))
    assert {k.split(".")[0] for k in ensemble.state_dict()} == {"net_a", "net_b"}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_matches_eager():
    torch.manual_seed(0)
    net_a, net_b = ResNet34Seg(base_width=4).eval(), VNetSeg(base_width=4).eval()
    ensemble = SoftmaxEnsemble(net_a, net_b).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    scripted = torch.jit.script(ensemble)
    with torch.no_grad():
        assert (scripted.net_a(x) - net_a(x)).abs().max().item() < 1e-5
        assert (scripted.net_b(x) - net_b(x)).abs().max().item() < 1e-5
        assert (scripted(x) - ensemble(x)).abs().max().item() < 1e-5
    with pytest.raises(Exception, match="divisible by 16"):
        scripted(torch.randn(1, 1, 33, 32, 32))
