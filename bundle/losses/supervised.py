"""Supervised segmentation loss on labeled data: cross-entropy + squared-denominator foreground Dice."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from bundle.losses.functional import check_label


class SupervisedLoss(nn.Module):
    """``L_sup,X = CE(z_X, y) + Dice(softmax(z_X), y)`` for one net X (J eq 2 without its CR part; C eq 2).

    * ``CE`` = mean over every labeled voxel of ``-log softmax(z)_y`` (all classes).
    * ``Dice = 1 - (2 sum q y + 1e-5) / (sum q^2 + sum y^2 + 1e-5)`` over the **whole** labeled sub-batch at once
      (``batch=True``), on the non-background channels only, averaged over them for ``C > 2``. This is MONAI's
      ``DiceLoss(softmax=True, to_onehot_y=True, include_background=False, squared_pred=True, batch=True,
      smooth_nr=1e-5, smooth_dr=1e-5)``, identical to the released code for ``C = 2`` (docs/methods/dual_network.md §2).

    Args (forward):
        logits: ``(B, C, *spatial)`` float logits.
        label: ``(B, 1, *spatial)`` integer class indices in ``[0, C)``.

    Returns:
        scalar ``CE + Dice``. :meth:`components` returns the two parts (the Dice decides the "winner", section 4.8).
    """

    def __init__(self) -> None:
        super().__init__()
        self.dice = DiceLoss(
            softmax=True,
            to_onehot_y=True,
            include_background=False,
            squared_pred=True,
            batch=True,
            smooth_nr=1e-5,
            smooth_dr=1e-5,
        )

    def components(self, logits: torch.Tensor, label: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(CE, Dice)``, two scalars."""
        check_label(logits, label)
        return F.cross_entropy(logits, label[:, 0].long()), self.dice(logits, label)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        ce, dice = self.components(logits, label)
        return ce + dice
