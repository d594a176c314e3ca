"""Cross Pseudo Supervision, CPS (Chen et al., CVPR 2021), in the 3D form of SSL4MIS
(docs/methods/cps.md)."""

from __future__ import annotations

from typing import Dict, Mapping, Optional

from torch import Tensor, nn

from bundle.losses.baselines import ArgmaxCrossPseudoLoss, HalfCEDiceLoss
from bundle.losses.functional import check_option
from bundle.losses.ramps import ramp_schedule, stepped_rampup
from bundle.methods.base import SSLMethod, Terms, Weights
from bundle.networks.subnets import SoftmaxEnsemble, SoftmaxOutput

#: which voxels the cross pseudo-labels cover (SSL4MIS: unlabeled; CPS paper: labeled + unlabeled).
CPS_TARGETS = ("unlabeled", "all")
#: how the two nets differ at start: SSL4MIS re-initialises net 2's Conv3d weights Xavier-normal.
CPS_INITS = ("kaiming_xavier", "default")
#: the network exported for inference: one branch (TorchSemiSeg, SSL4MIS) or the mean of both softmaxes.
CPS_INFER_NETS = ("net1", "net2", "mean")


def xavier_conv_init_(network: nn.Module) -> None:
    """``xavier_normal_`` on every ``Conv3d`` weight of ``network`` (docs/methods/cps.md: Kaiming-normal in net 1,
    Xavier-normal in net 2). ``ConvTranspose3d`` weights, biases and norm layers keep their initialisation."""
    for module in network.modules():
        if isinstance(module, nn.Conv3d):
            nn.init.xavier_normal_(module.weight)


class CrossPseudoSupervisionMethod(SSLMethod):
    """Two networks of the same architecture, each supervised by the other's hard pseudo-labels.

    One iteration at ``t`` (docs/methods/cps.md), with ``x = cat(x_l, x_u)`` ``(B_l + B_u, C_in, H, W, D)`` given to
    **both** nets unchanged (no noise; the nets differ through initialisation and dropout):

    * ``z^k = f_k(x)`` ``(B_l + B_u, C, H, W, D)``, ``k = 1, 2``, train mode;
    * ``sup = sum_k 1/2 [CE(z^k_l, y_l) + Dice(p^k_l, y_l)]`` (:class:`~bundle.losses.baselines.HalfCEDiceLoss`,
      ``dice_variant``, default SSL4MIS ``mean_sq``);
    * ``cps = CE(z^1_u, argmax_c sg(p^2_u)) + CE(z^2_u, argmax_c sg(p^1_u))``, each a voxel mean
      (:class:`~bundle.losses.baselines.ArgmaxCrossPseudoLoss`); ``cps_on="all"`` uses all ``B_l + B_u`` images.
      The targets are argmaxes of detached predictions, so each net receives gradient only through its own
      prediction, and one backward of the sum equals two separate backwards.

    :meth:`term_weights`: ``sup`` constant; ``cps`` is ``lambda(t) = w_cps r(step floor(t / step), rampup_iters)``
    (:func:`~bundle.losses.ramps.stepped_rampup`; LA preset ``w_cps = 0.1``, 6000 iterations in 150-iteration
    steps). No EMA; one optimizer over both nets (equivalent to two identical SGD optimizers).

    Args:
        net1, net2: two distinct V-Nets (:class:`~bundle.networks.subnets.VNetSeg`), constructed from different RNG
            draws.
        loss_weights: weights of ``("sup", "cps")``.
        max_iterations: total iterations.
        rampup_iters, rampup_step: the ``cps`` ramp; ``None`` (default): the whole run in 40 steps
            (:func:`~bundle.losses.ramps.ramp_schedule`; 6000 and 150 on LA).
        cps_on: ``"unlabeled"`` (SSL4MIS, default) or ``"all"`` (CPS paper).
        init: ``"kaiming_xavier"`` (net 2's Conv3d weights re-drawn Xavier-normal, SSL4MIS) or ``"default"`` (both
            keep their own Kaiming init).
        dice_variant: ``"mean_sq"`` (SSL4MIS, default), ``"fg_sq"`` or ``"bcp"``.
        infer_net: ``"net1"`` (default, as TorchSemiSeg and SSL4MIS), ``"net2"``, or ``"mean"`` (the mean of both
            softmaxes, :class:`~bundle.networks.subnets.SoftmaxEnsemble`; an ensemble, report it as one).
    """

    term_names = ("sup", "cps")
    unlabeled_terms = ("cps",)

    def __init__(
        self,
        net1: nn.Module,
        net2: nn.Module,
        loss_weights: Mapping[str, float],
        max_iterations: int,
        rampup_iters: Optional[int] = None,
        rampup_step: Optional[int] = None,
        cps_on: str = "unlabeled",
        init: str = "kaiming_xavier",
        dice_variant: str = "mean_sq",
        infer_net: str = "net1",
    ) -> None:
        super().__init__(loss_weights, max_iterations)
        if net1 is net2:
            raise ValueError("net1 and net2 must be two network instances (CPS collapses with one).")
        check_option("cps_on", cps_on, CPS_TARGETS)
        check_option("init", init, CPS_INITS)
        check_option("infer_net", infer_net, CPS_INFER_NETS)
        self.net1 = net1
        self.net2 = net2
        if init == "kaiming_xavier":
            xavier_conv_init_(self.net2)
        self.rampup_iters, self.rampup_step = ramp_schedule(max_iterations, rampup_iters, rampup_step)
        self.cps_on = cps_on
        self.infer_net = infer_net
        self.supervised = HalfCEDiceLoss(dice_variant)
        self.cross_pseudo = ArgmaxCrossPseudoLoss()
        if infer_net == "mean":
            self.set_inference_network(SoftmaxEnsemble(net1, net2))
        else:
            self.set_inference_network(SoftmaxOutput(net1 if infer_net == "net1" else net2))

    def term_weights(self, iteration: int) -> Dict[str, float]:
        """``sup`` constant; ``cps`` times ``r(step floor(t / step), rampup_iters)`` at ``iteration``."""
        weights = dict(self.loss_weights)
        weights["cps"] *= stepped_rampup(iteration, self.rampup_iters, self.rampup_step)
        return weights

    def terms(
        self, labeled_image: Tensor, label: Tensor, unlabeled_image: Optional[Tensor], iteration: int, active: Weights
    ) -> Terms:
        """See :meth:`SSLMethod.terms`: ``sup`` and ``cps`` from one forward of each net on
        :meth:`SSLMethod.joint_images`."""
        images = self.joint_images(labeled_image, unlabeled_image)
        logits_1, logits_2 = self.net1(images).float(), self.net2(images).float()  # float32, also under AMP
        labeled = slice(0, labeled_image.shape[0])
        losses: Terms = {}
        if "sup" in active:
            losses["sup"] = self.supervised(logits_1[labeled], label) + self.supervised(logits_2[labeled], label)
        if "cps" in active:
            rows = slice(0 if self.cps_on == "all" else labeled.stop, None)
            losses["cps"] = self.cross_pseudo(logits_1[rows], logits_2[rows])
        return losses
