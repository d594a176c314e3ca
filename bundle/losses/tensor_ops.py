"""Tensor helpers shared by the losses and methods: entropy, one-hot labels and clipped input noise.

The entropy's ``eps`` differs between the released codes the methods follow (1e-10 for the dual-network method,
1e-6 for UA-MT and DyCON); it is an argument here, and each caller passes the value of its code.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def entropy(prob: torch.Tensor, eps: float, keepdim: bool = False) -> torch.Tensor:
    """Per-voxel entropy ``H = -sum_c p_c ln(p_c + eps)`` (nats) of probabilities ``(B, C, *spatial)`` ->
    ``(B, *spatial)``, or ``(B, 1, *spatial)`` with ``keepdim``. ``prob`` must be probabilities, not logits."""
    return -(prob * torch.log(prob + eps)).sum(dim=1, keepdim=keepdim)


def one_hot(label: torch.Tensor, num_classes: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``(B, 1, *spatial)`` integer classes -> ``(B, C, *spatial)`` one-hot, float32 unless ``dtype`` is given."""
    return F.one_hot(label[:, 0].long(), num_classes).movedim(-1, 1).to(dtype or torch.float32)


def clipped_noise(images: torch.Tensor, std: float, clip: float) -> torch.Tensor:
    """``xi = clip(N(0, std^2), -clip, clip)``, one fresh draw per voxel, shaped like ``images`` (the teacher input
    noise of Mean Teacher, UA-MT and DyCON; docs/methods/mean_teacher.md, Eq. MT-2)."""
    return torch.clamp(torch.randn_like(images) * std, -clip, clip)
