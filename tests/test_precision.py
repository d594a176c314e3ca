"""The precision switch: what ``auto`` resolves to, the CPU bf16 probe, bf16 against fp32 on a tiny net, fp32
BatchNorm buffers, and the trainer's fp32 redo of a step whose bf16 gradients are not finite."""

import pytest
import torch
from ignite.engine import Events
from torch import nn

from bundle.methods.supervised_vnet import SupervisedVNetMethod
from bundle.precision import autocast, cpu_has_native_bf16, resolve_precision
from bundle.trainer import SSLTrainer, gradients_finite


def test_auto_is_fp32_on_cpu_and_fp16_amp_on_cuda():
    assert resolve_precision("auto", "cpu") == "fp32"
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
    assert cpu_has_native_bf16.__wrapped__(str(path)) is native
    assert cpu_has_native_bf16.__wrapped__(str(tmp_path / "missing")) is False


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


class NaNUnderBF16(nn.Module):
    """A conv net whose output turns NaN only under bf16 autocast, to exercise the trainer's fp32 redo."""

    def __init__(self):
        super().__init__()
        self.net = tiny_bn_net()

    def forward(self, x):
        out = self.net(x)
        return out * float("nan") if out.dtype == torch.bfloat16 else out


def test_a_step_with_non_finite_bf16_gradients_is_redone_in_fp32(caplog):
    method = SupervisedVNetMethod(NaNUnderBF16(), {"sup": 1.0}, max_iterations=2)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.01)
    image = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    batch = {"image": image, "label": (image > 0).float()}
    trainer = SSLTrainer("cpu", 2, 2, [batch], method, optimizer, precision="bf16")
    assert trainer.precision == "bf16"
    with caplog.at_level("WARNING"):
        trainer.run()
    assert "recomputed in fp32" in caplog.text
    assert all(torch.isfinite(p).all() for p in method.parameters())
    assert torch.isfinite(trainer.state.output["loss"])


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
