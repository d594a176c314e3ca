"""Supervised-only training of one V-Net: the reference every single-V-Net semi-supervised method is compared with."""

from __future__ import annotations

from typing import Mapping, Optional

from torch import Tensor, nn

from bundle.losses.baselines import HalfCEDiceLoss
from bundle.methods.base import SSLMethod, Terms, Weights
from bundle.networks.subnets import SoftmaxOutput


class SupervisedVNetMethod(SSLMethod):
    """One V-Net trained on the labeled batch only, with the baselines' supervised loss
    ``sup = 1/2 [CE(z_l, y_l) + Dice(p_l, y_l)]`` (:class:`~bundle.losses.baselines.HalfCEDiceLoss`, ``fg_sq``: the
    Dice of Mean Teacher, UA-MT and CPS), so that its row differs from theirs only by the unlabeled terms.

    Args:
        network: the V-Net (:class:`~bundle.networks.subnets.VNetSeg`), stored as ``net``.
        loss_weights: weight of ``("sup",)``.
        max_iterations: total iterations.
        dice_variant: see :class:`~bundle.losses.baselines.HalfCEDiceLoss`.
    """

    term_names = ("sup",)

    def __init__(
        self, network: nn.Module, loss_weights: Mapping[str, float], max_iterations: int, dice_variant: str = "fg_sq"
    ) -> None:
        super().__init__(loss_weights, max_iterations)
        self.net = network
        self.supervised = HalfCEDiceLoss(dice_variant)
        self.set_inference_network(SoftmaxOutput(network))

    def terms(
        self, labeled_image: Tensor, label: Tensor, unlabeled_image: Optional[Tensor], iteration: int, active: Weights
    ) -> Terms:
        """``{"sup": 1/2 (CE + Dice)}`` of the V-Net's float32 logits ``(B_l, C, H, W, D)`` on the labeled batch."""
        return {"sup": self.supervised(self.net(labeled_image).float(), label)}
