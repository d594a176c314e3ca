"""Activation checkpointing of the subnets: identical numbers (outputs, gradients, BatchNorm statistics, dropout
masks), fewer tensors kept for backward, and no effect outside training forwards."""

import copy

import pytest
import torch
from monai.bundle import ConfigParser

from bundle.networks.peer import DeepSupervisedVNet, ProjectionVNet
from bundle.networks.subnets import ResNet34Seg, VNetSeg, buffers_restored

FORWARDS = {
    ResNet34Seg: lambda net, x: list(net.forward_features(x)),
    VNetSeg: lambda net, x: list(net.forward_features(x)),
    DeepSupervisedVNet: lambda net, x: [t for group in net.forward_deep(x) for t in group],
    ProjectionVNet: lambda net, x: list(net.forward_embedding(x)),
}


def saved_tensor_bytes(function):
    """``function()`` and the bytes of the distinct storages autograd saved for backward while it ran."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = function()
    return result, sum(storages.values())


def train_step(net, x):
    """One training forward (fixed dropout seed) and backward of a loss on every output."""
    torch.manual_seed(1)
    outputs, saved = saved_tensor_bytes(lambda: FORWARDS[type(net)](net, x))
    sum((out.float() ** 2).mean() for out in outputs).backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    return outputs, saved, grads


@pytest.mark.parametrize("cls", list(FORWARDS))
def test_checkpointing_changes_no_number_and_keeps_fewer_tensors(cls):
    torch.manual_seed(0)
    plain = cls(base_width=4).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_activation_checkpointing(True)
    x = torch.randn(2, 1, 32, 32, 32)

    outputs_plain, saved_plain, grads_plain = train_step(plain, x)
    outputs_ckpt, saved_ckpt, grads_ckpt = train_step(checkpointed, x)

    for a, b in zip(outputs_plain, outputs_ckpt):
        assert torch.equal(a, b)
    assert grads_plain.keys() == grads_ckpt.keys() and len(grads_plain) > 0
    for name in grads_plain:
        assert torch.allclose(grads_plain[name], grads_ckpt[name], rtol=0, atol=1e-7), name
    # the backward rerun must not update BatchNorm a second time
    buffers_plain, buffers_ckpt = dict(plain.named_buffers()), dict(checkpointed.named_buffers())
    for name in buffers_plain:
        assert torch.equal(buffers_plain[name], buffers_ckpt[name]), name
    first_norm = next(m for m in checkpointed.encoder.stem.modules() if isinstance(m, torch.nn.BatchNorm3d))
    assert int(first_norm.num_batches_tracked) == 1
    # the full- and half-resolution stages dominate what a forward keeps (measured: 0.42-0.47 of it remains)
    assert saved_ckpt < 0.55 * saved_plain


def test_buffers_restored_undoes_batchnorm_updates():
    norm = torch.nn.BatchNorm3d(3).train()
    before = {name: b.clone() for name, b in norm.named_buffers()}
    with buffers_restored(norm):
        norm(torch.randn(2, 3, 4, 4, 4) + 5.0)
        assert not torch.equal(norm.running_mean, before["running_mean"])
    for name, buffer in norm.named_buffers():
        assert torch.equal(buffer, before[name]), name


@pytest.mark.parametrize("cls", [ResNet34Seg, VNetSeg])
def test_no_checkpointing_in_eval_or_without_grad(cls):
    torch.manual_seed(0)
    net = cls(base_width=4, activation_checkpointing=True)
    x = torch.randn(2, 1, 16, 16, 16, requires_grad=True)
    _, saved_eval = saved_tensor_bytes(lambda: net.eval()(x))
    plain = copy.deepcopy(net)
    plain.set_activation_checkpointing(False)
    _, saved_plain_eval = saved_tensor_bytes(lambda: plain.eval()(x))
    assert saved_eval == saved_plain_eval > 0  # eval forwards keep everything (no rerun)
    with torch.no_grad():
        torch.manual_seed(2)
        out = net.train()(x)
        torch.manual_seed(2)
        expected = plain.train()(x)
    assert torch.equal(out, expected) and out.grad_fn is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_checkpointed_network_scripts_and_loads_plain_weights():
    torch.manual_seed(0)
    net = ResNet34Seg(base_width=4, activation_checkpointing=True).eval()
    plain = ResNet34Seg(base_width=4)
    plain.load_state_dict(net.state_dict())  # same keys: model.pt is independent of the setting
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(torch.jit.script(net)(x), plain.eval()(x), atol=1e-5)


def test_la_preset_enables_checkpointing_and_train_json_default_and_override_do_not():
    """Off in ``train.json`` (32^3 patches), on in the LA preset (112x112x80), and an override wins over both."""
    cases = [
        (["configs/train.json"], None, False),
        (["configs/train.json", "configs/datasets/la.json"], None, True),
        (["configs/train.json", "configs/datasets/la.json"], False, False),
        (["configs/train.json"], True, True),
    ]
    for files, override, value in cases:
        parser = ConfigParser()
        parser.read_config(files)
        if override is not None:
            parser["activation_checkpointing"] = override
        for key in ("method#network_a", "method#network_b"):
            net = parser.get_parsed_content(key)
            stages = (net.encoder.stem, net.encoder.stages[0], net.decoder.stages[2], net.decoder.stages[3])
            assert all(stage.checkpoint_activations is value for stage in stages), (files, override)
        assert not net.encoder.stages[1].checkpoint_activations
