"""The dual-network method of Lu, Wu, Chaddad et al. (docs/methods/dual_network.md): Subnet A
(ResNet-34) and Subnet B (V-Net) trained together with supervised, consistency, pseudo-label and prototype terms."""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from bundle.losses.dual_network.consistency import CosineConsistencyLoss, MaskedConsistencyLoss
from bundle.losses.dual_network.prototype import PrototypeContrastiveLoss
from bundle.losses.dual_network.pseudo import CrossPseudoSupervisionLoss, EntropyFilteredLoss, UncertaintyRectifiedLoss
from bundle.losses.ramps import contrastive_ramp, sigmoid_rampup
from bundle.losses.supervised import SupervisedLoss
from bundle.methods.base import SSLMethod, Terms, Weights
from bundle.networks.subnets import SoftmaxEnsemble

#: terms that need the unlabeled batch (``ue`` and ``cos`` run on labeled + unlabeled samples).
UNLABELED_TERMS = ("cps", "efs", "ue", "pgl", "cos")
#: unlabeled terms scaled by the ``rampup_iters`` ramp (``pgl`` has its own ``lambda_c(t)``).
RAMPED_TERMS = ("cps", "efs", "ue", "cos")


class DualNetworkMethod(SSLMethod):
    """Two subnets trained jointly; inference averages their softmax
    (:class:`~bundle.networks.subnets.SoftmaxEnsemble`).

    Terms (each unweighted; the trainer multiplies by :meth:`term_weights` and sums), computed from **one** forward of
    each net on ``cat([labeled, unlabeled])``:

    * ``sup`` = ``CE_A + Dice_A + CE_B + Dice_B`` (:class:`~bundle.losses.supervised.SupervisedLoss`); labeled;
      each net its own.
    * ``cr`` = ``CR_A + CR_B`` (:class:`~bundle.losses.dual_network.consistency.MaskedConsistencyLoss`); labeled;
      each net its own; its weight is J's ``lambda`` (0.5 LA/BraTS, 0.6 Pancreas).
    * ``cps`` (:class:`~bundle.losses.dual_network.pseudo.CrossPseudoSupervisionLoss`); unlabeled; both nets,
      through their own prediction only.
    * ``efs`` (:class:`~bundle.losses.dual_network.pseudo.EntropyFilteredLoss`); unlabeled; both nets.
    * ``ue`` (:class:`~bundle.losses.dual_network.pseudo.UncertaintyRectifiedLoss`, student A, teacher B); labeled +
      unlabeled; A only.
    * ``pgl`` (:class:`~bundle.losses.dual_network.prototype.PrototypeContrastiveLoss`) on the loser's features;
      unlabeled; the loser only; its weight is multiplied by ``lambda_c(t)``
      (:func:`~bundle.losses.ramps.contrastive_ramp`).
    * ``cos`` (:class:`~bundle.losses.dual_network.consistency.CosineConsistencyLoss`); labeled + unlabeled; both
      nets.

    Logits and features are cast to float32 before any term, so the terms are also safe under AMP.

    The J-faithful total (docs/methods/dual_network.md §8) is obtained with weights ``sup=1, cr=lambda, cps=1, efs=1,
    ue=1, pgl=1, cos=1`` (``cos=0`` drops the C-only cosine term).

    **Winner switch** (docs/methods/dual_network.md §7): the winner is B if ``Dice_B < Dice_A`` (labeled Dice losses),
    else A. Because one backward of the summed loss is taken, the switch only decides whose decoder features (and
    argmax) PGL uses: the **loser's**. The choice of the latest call is kept in :attr:`pgl_feature_net` (``"a"`` or
    ``"b"``).

    Args:
        network_a: Subnet A (:class:`~bundle.networks.subnets.ResNet34Seg`), stored as ``net_a``; must provide
            ``forward_features`` when ``pgl`` is used.
        network_b: Subnet B (:class:`~bundle.networks.subnets.VNetSeg`), stored as ``net_b``.
        loss_weights: weight of each term in ``("sup", "cr", "cps", "efs", "ue", "pgl", "cos")``; missing = 0.
        max_iterations: total iterations (``t_max`` of the PGL ramp).
        cr_threshold: confidence ``tau`` of the CR mask (J: 0.6).
        cr_mask: ``"xor"`` (released code) or ``"or"`` (J's text).
        cps_threshold: confidence threshold of the CPS one-hot labels (J: 0.6).
        cps_normalization: ``"all"`` voxels or ``"confident"`` voxels.
        efs_percentile: entropy percentile ``alpha`` of EFS and of PGL's reliability mask (J: 70 LA, 80 Pancreas,
            30 BraTS; the released code used 20).
        efs_target: ``"union"`` (released code) or ``"own"`` (C eq 3).
        ue_target: ``"hard"`` (released code; temperature has no effect) or ``"soft"`` (sharpened with
            ``ue_temperature``).
        ue_temperature: ``T`` of the soft UE target (J: 0.5).
        pgl_reliability: ``"paper"`` (J eq 16) or ``"code"`` (released code's not-ignored set).
        pgl_sample_fraction: fraction of uncertain foreground voxels sampled per iteration (code: 0.01).
        pgl_detach_prototypes: stop the gradient through the prototypes.
        pgl_ramp_max: maximum of ``lambda_c(t)`` (0.1).
        pgl_ramp_step: quantisation of ``t`` in ``lambda_c`` (1 = smooth; 150 with ``max_iterations=6000``
            reproduces the released code's ``floor(t / 150) / 40``).
        rampup_iters: ``L`` of the sigmoid ramp ``r(t, L) = exp(-5 (1 - min(t, L) / L)^2)`` multiplying ``cps``,
            ``efs``, ``ue`` and ``cos``; 0 (the papers: full weight from the first iteration) disables it.
    """

    term_names = ("sup", "cr", "cps", "efs", "ue", "pgl", "cos")
    reference_preset = "supervised"
    unlabeled_terms = UNLABELED_TERMS

    def __init__(
        self,
        network_a: nn.Module,
        network_b: nn.Module,
        loss_weights: Mapping[str, float],
        max_iterations: int,
        cr_threshold: float = 0.6,
        cr_mask: str = "xor",
        cps_threshold: float = 0.6,
        cps_normalization: str = "all",
        efs_percentile: float = 70.0,
        efs_target: str = "union",
        ue_target: str = "hard",
        ue_temperature: float = 0.5,
        pgl_reliability: str = "paper",
        pgl_sample_fraction: float = 0.01,
        pgl_detach_prototypes: bool = False,
        pgl_ramp_max: float = 0.1,
        pgl_ramp_step: int = 1,
        rampup_iters: int = 0,
    ) -> None:
        super().__init__(loss_weights, max_iterations)
        self.net_a = network_a
        self.net_b = network_b
        self.set_inference_network(SoftmaxEnsemble(network_a, network_b))
        self.supervised = SupervisedLoss()
        self.cross_reliable = MaskedConsistencyLoss(threshold=cr_threshold, mask_rule=cr_mask)
        self.cross_pseudo = CrossPseudoSupervisionLoss(threshold=cps_threshold, normalization=cps_normalization)
        self.entropy_filtered = EntropyFilteredLoss(percentile=efs_percentile, target=efs_target)
        self.uncertainty_rectified = UncertaintyRectifiedLoss(target=ue_target, temperature=ue_temperature)
        self.prototype = PrototypeContrastiveLoss(
            percentile=efs_percentile,
            reliability=pgl_reliability,
            sample_fraction=pgl_sample_fraction,
            detach_prototypes=pgl_detach_prototypes,
        )
        self.cosine = CosineConsistencyLoss()
        self.pgl_ramp_max = pgl_ramp_max
        self.pgl_ramp_step = pgl_ramp_step
        self.pgl_feature_net: Optional[str] = None
        if rampup_iters < 0:
            raise ValueError(f"rampup_iters must be >= 0, got {rampup_iters}.")
        self.rampup_iters = int(rampup_iters)

    def term_weights(self, iteration: int) -> Dict[str, float]:
        """The config weights, with ``pgl`` multiplied by ``lambda_c(iteration)`` (docs/methods/dual_network.md §8) and
        ``cps``, ``efs``, ``ue``, ``cos`` by ``r(iteration, rampup_iters)``."""
        weights = dict(self.loss_weights)
        weights["pgl"] *= contrastive_ramp(iteration, self.max_iterations, self.pgl_ramp_max, self.pgl_ramp_step)
        ramp = sigmoid_rampup(iteration, self.rampup_iters)
        for name in RAMPED_TERMS:
            weights[name] *= ramp
        return weights

    def terms(
        self, labeled_image: Tensor, label: Tensor, unlabeled_image: Optional[Tensor], iteration: int, active: Weights
    ) -> Terms:
        """See :meth:`SSLMethod.terms`; one forward of each net on :meth:`SSLMethod.joint_images`."""
        images = self.joint_images(labeled_image, unlabeled_image)
        num_labeled = labeled_image.shape[0]

        if "pgl" in active:
            logits_a, features_a = self.net_a.forward_features(images)
            logits_b, features_b = self.net_b.forward_features(images)
        else:
            logits_a, logits_b = self.net_a(images), self.net_b(images)
        logits_a, logits_b = logits_a.float(), logits_b.float()  # every term in float32, also under AMP
        labeled_a, labeled_b = logits_a[:num_labeled], logits_b[:num_labeled]
        unlabeled_a, unlabeled_b = logits_a[num_labeled:], logits_b[num_labeled:]

        losses: Dict[str, torch.Tensor] = {}
        if "sup" in active or "pgl" in active:
            ce_a, dice_a = self.supervised.components(labeled_a, label)
            ce_b, dice_b = self.supervised.components(labeled_b, label)
            losses["sup"] = ce_a + dice_a + ce_b + dice_b
        if "cr" in active:
            losses["cr"] = self.cross_reliable(labeled_a, labeled_b, label)
        if "cps" in active:
            losses["cps"] = self.cross_pseudo(unlabeled_a, unlabeled_b)
        if "efs" in active:
            losses["efs"] = self.entropy_filtered(unlabeled_a, unlabeled_b)
        if "ue" in active:
            losses["ue"] = self.uncertainty_rectified(logits_a, logits_b)
        if "pgl" in active:
            self.pgl_feature_net = "a" if bool(dice_b < dice_a) else "b"
            if self.pgl_feature_net == "a":
                losses["pgl"] = self.prototype(features_a[num_labeled:].float(), unlabeled_a, unlabeled_b)
            else:
                losses["pgl"] = self.prototype(features_b[num_labeled:].float(), unlabeled_b, unlabeled_a)
        if "cos" in active:
            losses["cos"] = self.cosine(logits_a, logits_b)
        return losses
