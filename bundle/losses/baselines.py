"""Loss terms of the baseline methods (Mean Teacher, UA-MT, CPS, BCP; docs/methods/).

Every term takes **logits** ``(B, C, *spatial)`` and integer labels ``(B, 1, *spatial)`` (as the trainer passes them)
and returns a scalar. Probabilities are ``p = softmax_C(z)``; ``sg`` is stop-gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from bundle.losses.functional import (
    check_label,
    check_option,
    class_argmax,
    masked_cross_entropy,
    one_hot,
    soft_dice_loss,
)

#: Dice variants of the baselines' supervised loss (docs/methods/README.md §3).
DICE_VARIANTS = ("fg_sq", "mean_sq", "bcp")


class RegionDiceLoss(nn.Module):
    """BCP's Dice (``mask_DiceLoss``; docs/methods/README.md §3, variant ``bcp``), per sample and class with a linear
    denominator and an optional region weight ``R``:

        ``D = 1 - mean_{n,c} (2 sum_v R_v p_{n,c,v} y_{n,c,v} + eps) / (sum_v R_v (p_{n,c,v} + y_{n,c,v}) + eps)``

    with ``eps = 1e-5``, ``y`` the one-hot label and every class (background included) in the mean
    (:func:`~bundle.losses.functional.soft_dice_loss`).

    Args (forward):
        logits: ``(B, C, *spatial)``.
        label: ``(B, 1, *spatial)`` integer class indices.
        region: ``(B or 1, 1, *spatial)`` weights in ``[0, 1]`` (BCP's copy-paste mask or its complement), or
            ``None`` for ``R = 1``.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, logits: torch.Tensor, label: torch.Tensor, region: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_label(logits, label)
        prob = torch.softmax(logits, dim=1)
        return soft_dice_loss(prob, one_hot(label, logits.shape[1], prob.dtype), self.eps, region)


class HalfCEDiceLoss(nn.Module):
    """The baselines' supervised loss ``L_sup = 1/2 [CE(z, y) + Dice(p, y)]`` (docs/methods/README.md §3), with

    * ``fg_sq`` (UA-MT): ``1 - (2 sum p_1 y + eps) / (sum p_1^2 + sum y^2 + eps)`` over the whole sub-batch,
      foreground channel(s) only (averaged over them for ``C > 2``), ``eps = 1e-5``. Equal to half of
      :class:`~bundle.losses.supervised.SupervisedLoss`.
    * ``mean_sq`` (SSL4MIS ``DiceLoss(C)``): the same per class, background included, averaged over ``C``.
    * ``bcp``: :class:`RegionDiceLoss` with ``R = 1``.

    Args (forward):
        logits: ``(B, C, *spatial)``; label: ``(B, 1, *spatial)`` integer class indices.
    """

    def __init__(self, dice_variant: str = "fg_sq") -> None:
        super().__init__()
        check_option("dice_variant", dice_variant, DICE_VARIANTS)
        self.dice_variant = dice_variant
        if dice_variant == "bcp":
            self.dice: nn.Module = RegionDiceLoss()
        else:
            self.dice = DiceLoss(
                softmax=True,
                to_onehot_y=True,
                include_background=dice_variant == "mean_sq",
                squared_pred=True,
                batch=True,
                smooth_nr=1e-5,
                smooth_dr=1e-5,
            )

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        check_label(logits, label)
        return 0.5 * (F.cross_entropy(logits, label[:, 0].long()) + self.dice(logits, label))


class SoftmaxMSELoss(nn.Module):
    """Mean Teacher / UA-MT consistency between the student and a detached teacher (docs/methods/mean_teacher.md Eq.
    MT-4, docs/methods/ua_mt.md Eq. UA-4):

        ``L_cons = sum_{n,c,v} m_{n,v} (p_{n,c,v} - sg(pbar_{n,c,v}))^2 / (C sum_{n,v} m_{n,v} + eps)``

    ``m = 1`` (``mask=None``) gives the plain mean over ``B C V`` (Mean Teacher, exactly ``mean(...)``); UA-MT's
    certainty mask gives the mean over the selected voxels and all channels, 0 for an empty mask (``eps = 1e-16``).
    Hand-written: no MONAI loss takes a voxel mask with this normalisation.

    Args (forward):
        student_logits: ``(B, C, *spatial)``.
        teacher_prob: ``(B, C, *spatial)`` teacher probabilities (detached here in any case).
        mask: ``(B, 1, *spatial)`` bool/float, or ``None``.
    """

    def __init__(self, eps: float = 1e-16) -> None:
        super().__init__()
        self.eps = eps

    def forward(
        self, student_logits: torch.Tensor, teacher_prob: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if student_logits.shape != teacher_prob.shape:
            raise ValueError(f"shapes differ: student {list(student_logits.shape)}, teacher {list(teacher_prob.shape)}")
        squared_error = (torch.softmax(student_logits, dim=1) - teacher_prob.detach()) ** 2
        if mask is None:
            return squared_error.mean()
        mask = mask.to(squared_error.dtype)
        return (mask * squared_error).sum() / (student_logits.shape[1] * mask.sum() + self.eps)


class ArgmaxCrossPseudoLoss(nn.Module):
    """CPS with hard pseudo-labels, as in SSL4MIS's 3D script (docs/methods/cps.md, Eq. CPS-2):

        ``L_cps = CE(z^1, argmax_c sg(p^2)) + CE(z^2, argmax_c sg(p^1))``

    each CE a mean over all voxels. The targets carry no gradient, so each net receives gradient only through its
    own prediction (one backward of the sum equals two separate backwards). Unlike the dual method's
    :class:`~bundle.losses.dual_network.pseudo.CrossPseudoSupervisionLoss` there is no confidence threshold.

    Args (forward):
        logits_1, logits_2: ``(B, C, *spatial)`` logits of the two nets on the same images.
    """

    def forward(self, logits_1: torch.Tensor, logits_2: torch.Tensor) -> torch.Tensor:
        target_1, target_2 = class_argmax(logits_1.detach()), class_argmax(logits_2.detach())
        return F.cross_entropy(logits_1, target_2) + F.cross_entropy(logits_2, target_1)


class CopyPasteLoss(nn.Module):
    """BCP's loss on one copy-paste image (``mix_loss``; docs/methods/bcp.md, Eq. BCP-4). The image holds one source
    where the mask ``M`` is 1 (outside the cube) and another inside the cube (``M = 0``); each part has its own
    target and weight (1 for a ground-truth part, ``u_weight`` for a pseudo-labelled part):

        ``L = 1/2 [w_o D(p, y_o; M) + w_i D(p, y_i; 1 - M) + w_o CE_M(z, y_o) + w_i CE_{1-M}(z, y_i)]``

    with ``D`` the :class:`RegionDiceLoss` and ``CE_R(z, y) = sum_{n,v} R_v ce_{n,v} / (sum_{n,v} R_v + 1e-16)`` the
    region cross-entropy (docs/methods/README.md, Eq. S-3; :func:`~bundle.losses.functional.masked_cross_entropy`).

    Args (forward):
        logits: ``(B, C, *spatial)``.
        outside_label, inside_label: ``(B, 1, *spatial)`` targets of the ``M = 1`` and ``M = 0`` parts.
        mask: ``(B or 1, 1, *spatial)`` with 1 outside the cube and 0 inside.
        outside_weight, inside_weight: ``w_o``, ``w_i``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dice = RegionDiceLoss()

    def forward(
        self,
        logits: torch.Tensor,
        outside_label: torch.Tensor,
        inside_label: torch.Tensor,
        mask: torch.Tensor,
        outside_weight: float,
        inside_weight: float,
    ) -> torch.Tensor:
        outside_term = self._part(logits, outside_label, mask)
        inside_term = self._part(logits, inside_label, 1.0 - mask)
        return 0.5 * (outside_weight * outside_term + inside_weight * inside_term)

    def _part(self, logits: torch.Tensor, label: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """``D(p, y; R) + CE_R(z, y)`` of one part."""
        dice = self.dice(logits, label, region)
        ce = masked_cross_entropy(F.log_softmax(logits, dim=1), label[:, 0].long(), region[:, 0], eps=1e-16)
        return dice + ce
