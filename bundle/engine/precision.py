"""Numeric precision of training and inference: ``auto`` | ``fp32`` | ``bf16`` | ``fp16``.

``auto`` is fp16 AMP (with a gradient scaler in training) on CUDA, bf16 autocast on a CPU with native bf16 arithmetic
(AVX-512 BF16 or AMX on x86, the ``bf16`` feature on Arm; :func:`cpu_has_native_bf16`) and fp32 on other CPUs, where
bf16 kernels are emulated and slower than fp32. bf16 made forward + backward of both subnets at 64x64x32 2.7x faster
on an AMD EPYC with AVX-512 BF16 and 2.3x on an Intel Xeon with AMX (1 and 2 threads; see docs/RESULTS.md).

Under autocast only the autocast-listed ops (convolutions, matmuls) run in the low precision; parameters, BatchNorm
statistics, optimizer state and checkpoints stay fp32, every method casts its logits to fp32 before its losses,
softmaxes and pseudo-labels, and :class:`AutocastInference` returns fp32 outputs, so that the sliding-window stitching
buffer stays fp32.

oneDNN's bf16 convolution backward (torch 2.13 CPU, oneDNN 3.12) computes a wrong weight gradient, reading
uninitialised memory and sometimes corrupting the heap, when the first spatial axis of a stride-1 ``Conv3d``'s input
is shorter than the kernel along it but longer than 1 (2 for a ``3^3`` kernel: the 1/16 stage of a 32^3 patch; 2..6
for ``7^3``) and the layer has 16 or more input or output channels (8 in and 8 out was right); the forward and the
input gradient are right; stride-2 and transposed convolutions and the other two axes were not affected.
:func:`guard_small_depth_convolutions` runs every ``Conv3d`` whose input is shorter than its kernel along that axis in
fp32; at the 64x64x32, 96^3 and 112x112x80 patches no layer qualifies, so it changes nothing there.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, ContextManager, List, Tuple

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

#: /proc/cpuinfo flags that mean bf16 arithmetic in hardware (x86 ``flags``, Arm ``Features``).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> Tuple[str, ...]:
    """The ``flags`` (x86) or ``Features`` (Arm) of the first processor in ``cpuinfo_path``; empty where the file
    cannot be read (e.g. not Linux)."""
    try:
        with open(cpuinfo_path) as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return tuple(value.split())
    except OSError:
        pass
    return ()


def cpu_has_native_bf16(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes in bf16 natively (:data:`NATIVE_BF16_FLAGS` in :func:`cpu_flags`)."""
    return any(flag in cpu_flags(cpuinfo_path) for flag in NATIVE_BF16_FLAGS)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The concrete precision, ``fp32`` | ``bf16`` | ``fp16``, that ``precision`` means on ``device``; ``fp16``
    needs CUDA."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    device_type = torch.device(device).type
    if precision == "fp16" and device_type != "cuda":
        raise ValueError("precision 'fp16' (AMP with a gradient scaler) needs a CUDA device; use 'bf16' on CPU.")
    if precision != "auto":
        return precision
    if device_type == "cuda":
        return "fp16"
    return "bf16" if device_type == "cpu" and cpu_has_native_bf16() else "fp32"


def emulated_bf16(precision: str, device: torch.device | str) -> bool:
    """Whether the *resolved* ``precision`` is bf16 on a CPU without native bf16, where PyTorch emulates it: a
    training iteration of the LA ``cpu`` protocol then takes tens of times longer than in fp32 (supervised V-Net, one
    thread on an AVX2-only AMD EPYC beside two other trainings: 89 s against 2.1 s)."""
    return precision == "bf16" and torch.device(device).type == "cpu" and not cpu_has_native_bf16()


def autocast(precision: str, device: torch.device | str) -> ContextManager:
    """The autocast context of a *resolved* precision on ``device`` (a no-op for ``fp32``)."""
    device_type = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type, dtype=dtype)


class AutocastInference(nn.Module):
    """``network``'s forward under the autocast of ``precision`` (``auto`` resolved on ``device``), its outputs (a
    tensor or a tuple of tensors) cast to fp32, e.g. for ``SlidingWindowInferer`` (whose stitching buffers take the
    input's dtype, fp32 for our images). ``network`` stays a submodule, so mode switches reach it; its state dict gets
    a ``network.`` prefix, so load weights into ``network`` itself."""

    def __init__(self, network: nn.Module, precision: str = "auto", device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.network = network
        self.device_type = torch.device(device).type
        self.precision = resolve_precision(precision, device)

    def forward(self, x: torch.Tensor) -> Any:
        with autocast(self.precision, self.device_type):
            output = self.network(x)
        if isinstance(output, (tuple, list)):
            return type(output)(item.float() for item in output)
        return output.float()


def needs_fp32(conv: nn.Conv3d, x: torch.Tensor) -> bool:
    """Whether ``conv`` must run in fp32 on ``x`` under CPU bf16 autocast: its input's first spatial axis is shorter
    than its kernel there (the oneDNN weight-gradient bug of the module docstring; kept wider than the observed
    ``1 < size < kernel``, stride 1, 16+ channels, since a fp32 convolution at such a size costs little)."""
    return (
        x.device.type == "cpu"
        and x.dim() == 5
        and x.shape[2] < conv.kernel_size[0]
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


class _FP32ConvHooks:
    """Forward pre-hook and hook pair that suspends CPU autocast around one convolution (see :func:`needs_fp32`)."""

    def __init__(self) -> None:
        self.suspended: List[bool] = []  # one entry per convolution call in flight

    def before(self, conv: nn.Conv3d, args: Tuple[torch.Tensor, ...]) -> Any:
        suspend = needs_fp32(conv, args[0])
        self.suspended.append(suspend)
        if suspend:
            torch.set_autocast_enabled("cpu", False)
            return (args[0].float(), *args[1:])
        return None

    def after(self, conv: nn.Conv3d, args: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self.suspended.pop():
            torch.set_autocast_enabled("cpu", True)


def guard_small_depth_convolutions(network: nn.Module) -> int:
    """Make every ``nn.Conv3d`` of ``network`` (transposed convolutions are not affected) run in fp32 when
    :func:`needs_fp32`, through forward hooks, so that also the recomputation of activation checkpointing is covered
    and the state dict is unchanged. Idempotent; returns the number of convolutions newly guarded."""
    hooks = _FP32ConvHooks()
    guarded = 0
    for module in network.modules():
        if isinstance(module, nn.Conv3d) and not getattr(module, "_fp32_small_depth_guard", False):
            module.register_forward_pre_hook(hooks.before)
            module.register_forward_hook(hooks.after)
            module._fp32_small_depth_guard = True
            guarded += 1
    return guarded
