"""Numeric precision of training: ``auto`` | ``fp32`` | ``bf16`` | ``fp16``.

``auto`` is fp16 AMP with a gradient scaler on CUDA and fp32 on CPU. ``bf16`` (autocast) pays on a CPU with native
bf16 arithmetic (AVX-512 BF16 or AMX on x86, the ``bf16`` feature on Arm; :func:`cpu_has_native_bf16`): 2.7x faster
forward + backward of both subnets at 64x64x32 on an AMD EPYC with AVX-512 BF16; elsewhere its kernels are emulated
and slower than fp32. ``auto`` does not choose it yet because oneDNN's bf16 convolution backward (torch 2.13 CPU)
reads uninitialised memory when the first spatial axis of its input is 2 (a 32^3 patch's 1/16 stage; not the
64x64x32, 96^3 or 112x112x80 patches' stages), giving NaN or wrong gradients; the trainer redoes a step with
non-finite bf16 gradients in fp32 (:class:`bundle.trainer.SSLTrainer`).

Under autocast only the autocast-listed ops (convolutions, matmuls) run in
the low precision; parameters, BatchNorm statistics, optimizer state and checkpoints stay fp32, and every method casts
its logits to fp32 before its losses, softmaxes and pseudo-labels. Hand-written because torch offers the autocast
context but no way to ask whether bf16 is native on this CPU.
"""

from __future__ import annotations

import contextlib
import functools
from typing import ContextManager

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

#: /proc/cpuinfo flags that mean bf16 arithmetic in hardware (x86 ``flags``, Arm ``Features``).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes in bf16 natively, from the ``flags``/``Features`` lines of ``cpuinfo_path``
    (False where the file cannot be read, e.g. not Linux)."""
    try:
        with open(cpuinfo_path) as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return any(flag in value.split() for flag in NATIVE_BF16_FLAGS)
    except OSError:
        pass
    return False


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
    return "fp16" if device_type == "cuda" else "fp32"


def autocast(precision: str, device: torch.device | str) -> ContextManager:
    """The autocast context of a *resolved* precision on ``device`` (a no-op for ``fp32``)."""
    device_type = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type, dtype=dtype)
