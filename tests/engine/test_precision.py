"""The precision switch: what ``auto`` resolves to, the CPU bf16 probe, bf16 against fp32 on a tiny net, fp32
BatchNorm buffers, the fp32 guard of the convolutions whose bf16 weight gradient oneDNN gets wrong, bf16 inference,
and the stop on non-finite losses."""

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer
from torch import nn
from torch.utils.checkpoint import checkpoint

from bundle.engine import precision
from bundle.engine.precision import (
    AutocastInference,
    autocast,
    cpu_has_native_bf16,
    guard_small_depth_convolutions,
    needs_fp32,
    resolve_precision,
)
from bundle.engine.trainer import SSLTrainer, gradients_finite
from bundle.inference.folder import SubnetDisagreement
from bundle.inference.optimization import optimize_for_inference
from bundle.methods.supervised_vnet import SupervisedVNetMethod
from bundle.networks.subnets import ResNet34Seg, SoftmaxEnsemble, VNetSeg
from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_is_bf16_on_cpus_with_native_bf16_fp32_on_others_and_fp16_amp_on_cuda(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("auto", "cuda:0") == "fp16"
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("half", "cpu")


@pytest.mark.parametrize(
    "text, native",
    [("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n", True), ("flags : fpu avx2 avx512f\n", False),
     ("Features\t: fp asimd bf16 i8mm\n", True), ("processor : 0\n", False)],  # fmt: skip
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, text, native):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\n" + text)
    assert cpu_has_native_bf16(str(path)) is native
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is False


def tiny_bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(), nn.Conv3d(8, 2, 1))


def test_bf16_outputs_are_close_to_fp32_and_buffers_stay_fp32():
    net = tiny_bn_net().train()
    x = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    reference = net(x).detach()
    net.load_state_dict(tiny_bn_net().state_dict())  # undo the BatchNorm update of the fp32 forward
    with autocast("bf16", "cpu"):
        low = net(x)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), reference, atol=0.05, rtol=0.05)
    assert (low.float() - reference).abs().max() > 0  # really computed in bf16
    batch_norm = net[1]
    assert batch_norm.running_mean.dtype == torch.float32 and batch_norm.running_var.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in net.parameters())


def nan_filled_heap():
    """Allocate and free NaN-filled blocks, so that a kernel reading uninitialised memory is likely to read NaN."""
    blocks = [torch.full((size,), float("nan")) for size in (2**10, 2**14, 2**16, 2**18, 2**20)]
    del blocks


def small_depth_net():
    """Two 3^3 convolutions over 32 channels, the layer shape whose bf16 weight gradient oneDNN gets wrong when the
    input's first spatial axis is 2."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv3d(32, 32, 3, padding=1, bias=False))


def weight_gradients(net, x, precision, checkpointed=False):
    net.zero_grad()
    nan_filled_heap()
    with autocast(precision, "cpu"):
        out = checkpoint(net, x, use_reentrant=False) if checkpointed else net(x)
    out.float().square().sum().backward()
    return out.dtype, [conv.weight.grad.clone() for conv in (net[0], net[2])]


@pytest.mark.parametrize("checkpointed", [False, True])
def test_guarded_bf16_weight_gradients_match_fp32_at_depth_2(checkpointed):
    net = small_depth_net()
    x = torch.randn(2, 32, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    _, reference = weight_gradients(net, x, "fp32")
    assert guard_small_depth_convolutions(net) == 2
    assert guard_small_depth_convolutions(net) == 0  # idempotent
    for _ in range(3):  # unguarded, oneDNN gave inf/NaN or 100 % errors in every one of three tries here
        dtype, grads = weight_gradients(net, x, "bf16", checkpointed)
        assert dtype == torch.float32  # both convolutions ran outside autocast
        for grad, ref in zip(grads, reference):
            assert torch.isfinite(grad).all()
            assert float((grad - ref).norm() / ref.norm()) < 1e-5
    assert torch.is_autocast_enabled("cpu") is False


def test_the_guard_keeps_bf16_where_the_depth_reaches_the_kernel():
    net = small_depth_net()
    guard_small_depth_convolutions(net)
    x = torch.randn(1, 32, 3, 2, 2, generator=torch.Generator().manual_seed(4))  # only the other axes are short
    dtype, grads = weight_gradients(net, x, "bf16")
    assert dtype == torch.bfloat16
    with autocast("bf16", "cpu"):
        assert not needs_fp32(net[0], x)
        assert needs_fp32(net[0], x[:, :, :2]) and needs_fp32(nn.Conv3d(1, 1, 7), torch.zeros(1, 1, 6, 8, 8))
    assert not needs_fp32(net[0], x[:, :, :2])  # outside autocast nothing is changed


@pytest.mark.parametrize("patch, guarded", [((64, 64, 32), 0), ((112, 112, 80), 0), ((32, 32, 32), 5 + 3)])
def test_the_guard_is_a_no_op_for_the_cpu_protocol_patch(patch, guarded):
    """At the LA cpu protocol's 64x64x32 patch (its records were trained in bf16) and at 112x112x80 no convolution of
    either subnet qualifies; at train.json's 32^3 the 3^3 convolutions of the 2x2x2 stage do (5 of the ResNet's 47
    convolutions after the stride-2 one, 3 of the V-Net's 26). The guard depends on the spatial shape only, so the
    networks are narrow (a full-width 112x112x80 forward in bf16 takes minutes on a CPU that emulates bf16)."""
    qualifying = []
    nets = [ResNet34Seg(base_width=2), VNetSeg(base_width=2)]
    for net in nets:
        for module in net.modules():
            if isinstance(module, nn.Conv3d):
                module.register_forward_pre_hook(lambda m, args: qualifying.append(needs_fp32(m, args[0])))
    with torch.no_grad(), autocast("bf16", "cpu"):
        for net in nets:
            net.eval()(torch.zeros(1, 1, *patch))
    assert len(qualifying) == 47 + 26 and sum(qualifying) == guarded


def small_ensemble():
    torch.manual_seed(0)
    return SoftmaxEnsemble(ResNet34Seg(base_width=4), VNetSeg(base_width=4)).eval()


@pytest.mark.parametrize("optimized", [False, True])
def test_bf16_sliding_window_inference_agrees_with_fp32(optimized):
    ensemble = small_ensemble()
    if optimized:
        optimize_for_inference(ensemble)  # folded norms, channels-last weights: inference.json's default
    volume = torch.randn(1, 1, 40, 36, 32, generator=torch.Generator().manual_seed(5))
    inferer = SlidingWindowInferer(roi_size=(32, 32, 32), sw_batch_size=2, overlap=0.5, mode="constant")
    low = AutocastInference(ensemble, "bf16", "cpu")
    assert low.precision == "bf16" and AutocastInference(ensemble, "fp32").precision == "fp32"
    with torch.no_grad():
        reference, prob = inferer(volume, ensemble), inferer(volume, low)
    assert reference.dtype == prob.dtype == torch.float32  # the stitching buffer is fp32
    assert torch.allclose(prob.sum(dim=1), torch.ones(1), atol=1e-5)
    difference = (prob - reference).abs()
    assert 0 < difference.max() < 0.05
    assert (prob.argmax(1) == reference.argmax(1)).float().mean() > 0.99
    assert all(b.dtype != torch.bfloat16 for b in ensemble.buffers()) and all(
        p.dtype == torch.float32 for p in ensemble.parameters()
    )


def test_autocast_inference_returns_fp32_tuples():
    wrapped = AutocastInference(SubnetDisagreement(small_ensemble()), "bf16", "cpu")
    with torch.no_grad():
        prob, disagreement = wrapped(torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(6)))
    assert prob.dtype == disagreement.dtype == torch.float32
    assert prob.shape == (1, 2, 16, 16, 16) and disagreement.shape == (1, 1, 16, 16, 16)


def test_gradients_finite():
    net = nn.Linear(2, 1)
    assert gradients_finite(net)  # no gradient yet
    net(torch.ones(1, 2)).sum().backward()
    assert gradients_finite(net)
    net.weight.grad[0, 0] = float("inf")
    assert not gradients_finite(net)


class NaNAtSecondIteration(nn.Module):
    """Finite logits at the first call, NaN from the second on."""

    def __init__(self):
        super().__init__()
        self.net = tiny_bn_net()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.net(x)
        return out if self.calls == 1 else out * float("nan")


def test_a_non_finite_loss_stops_training_before_the_step_naming_iteration_and_term():
    method = SupervisedVNetMethod(NaNAtSecondIteration(), {"sup": 1.0}, max_iterations=3)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.01)
    image = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    trainer = SSLTrainer("cpu", 3, 3, [{"image": image, "label": (image > 0).float()}], method, optimizer)
    after_first = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: after_first or after_first.update(
        {k: v.clone() for k, v in method.state_dict().items()}))  # fmt: skip
    with pytest.raises(FloatingPointError, match="iteration 2: non-finite sup"):
        trainer.run()
    for key, value in method.state_dict().items():
        if value.is_floating_point() and "running" not in key:  # the NaN forward still updated BatchNorm statistics
            assert torch.equal(value, after_first[key]), key


def test_inference_precision_follows_training_except_in_the_cpu_protocol():
    """train.json's validation and evaluate.json use ``validate#precision`` (default: the training precision); the LA
    cpu protocol trains in bf16 but evaluates in fp32, as when its records were made."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    parser.update({"train#trainer#precision": "fp32"})
    assert parser.get_parsed_content("validate#precision") == "fp32"
    assert parser["validate#evaluator#network#_target_"] == "bundle.engine.precision.AutocastInference"
    assert parser.get_parsed_content("validate#evaluator#network#precision") == "fp32"
    parser.read_config([str(CONFIGS / n) for n in ("train.json", "benchmark/la_cpu.json", "evaluate.json")])
    assert parser.get_parsed_content("train#trainer#precision") == "bf16"
    assert parser.get_parsed_content("validate#precision") == "fp32"


@pytest.mark.parametrize("native", [False, True])
def test_forcing_bf16_on_a_cpu_without_native_bf16_warns_that_it_is_emulated(monkeypatch, caplog, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda *args: native)
    method = SupervisedVNetMethod(tiny_bn_net(), {"sup": 1.0}, max_iterations=1)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.01)
    image = torch.randn(2, 1, 8, 8, 8)
    with caplog.at_level("WARNING", logger="bundle.engine.trainer"):
        for forced in ("bf16", "fp32"):
            SSLTrainer("cpu", 1, 1, [{"image": image, "label": image > 0}], method, optimizer, precision=forced)
    warnings = [r.getMessage() for r in caplog.records if "emulates" in r.getMessage()]
    assert len(warnings) == (0 if native else 1)  # bf16 only, and only without native bf16
