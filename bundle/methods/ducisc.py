"""DuCiSC (Wu, Wang, Cui, IEEE TMI 2025): dual cross-image semantic consistency in a mean teacher with self-aware
thresholds (docs/methods/ducisc.md)."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from bundle.losses.ducisc import (
    DeepSupervisedCEDiceLoss,
    PrototypeAlignmentLoss,
    normalize_by_value,
    resize_label,
    resize_soft,
)
from bundle.losses.functional import one_hot
from bundle.methods.base import Terms, Weights
from bundle.methods.ema import StudentTeacherMethod

#: terms that need the unlabeled batch.
UNLABELED_TERMS = ("cs_ulb", "cs_mix", "proto_ulb", "proto_mix")
#: terms that need the mixed images.
MIXED_TERMS = ("cs_mix", "proto_mix")


def mixup(
    labeled: torch.Tensor, label_1hot: torch.Tensor, unlabeled: torch.Tensor, pseudo_1hot: torch.Tensor, sigma
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eq. (5): ``x_k = sigma x_i + (1 - sigma) x_j`` and ``y_k = sigma y_i + (1 - sigma) ybar_j``.

    Args:
        labeled, unlabeled: ``(n, C_in, *sp)`` images of the ``n`` pairs (labeled ``k`` with unlabeled ``k``).
        label_1hot, pseudo_1hot: ``(n, C, *sp)`` one-hot ground truth and teacher arg-max (full resolution).
        sigma: ``(n,)`` mixing ratios (the code draws ``U(0.25, 0.75)`` per pair).

    Returns:
        ``x_mix (n, C_in, *sp)`` and the soft label ``y_mix (n, C, *sp)`` with values in ``{0, s, 1-s, 1}``.
    """
    s = sigma.view(-1, *([1] * (labeled.dim() - 1))).to(labeled)
    return s * labeled + (1.0 - s) * unlabeled, s * label_1hot + (1.0 - s) * pseudo_1hot


class SelfAwareThresholds(nn.Module):
    """Self-aware class-wise confidence thresholds ``T[s, c]`` (Eq. 8-9; docs/methods/ducisc.md, Eq. DC-3), a saved
    buffer.

    * Init (Eq. 8, ``t = 0``): ``T = 1 / C``.
    * Certainty mask at scale ``s``: ``M^s(v) = [max_c q_c(v) > T[s, argmax_c q_c(v)]]`` for the teacher
      probabilities ``q^s``; for ``C = 2`` and ``T >= 0.5`` this is the code's ``q_bg > T_bg or q_fg > T_fg``.
    * Update (Eq. 8-9, code semantics): ``P[s, c] = mean`` of the **student** probability of class ``c`` over every
      voxel of the unlabeled sub-batch whose teacher arg-max is ``c`` (pooled over the batch, detached); where that
      set is non-empty, ``T[s, c] <- clip(beta T[s, c] + (1 - beta) P[s, c], t_min, t_max)``. Empty classes keep
      their threshold.

    ``per_scale=False`` keeps one row shared by all scales (the paper's single ``T^c``), updated from the
    full-resolution head only. The paper neither clips nor pools over the batch; ``t_min=0, t_max=1`` removes the
    clip.

    Args:
        num_scales: ``S`` (4 heads).
        num_classes: ``C``.
        beta: EMA factor (0.99, paper Fig. 7a).
        t_min, t_max: clip range (code: 0.5, 0.95).
        per_scale: one row per scale (code) or one shared row.
    """

    def __init__(
        self,
        num_scales: int,
        num_classes: int,
        beta: float = 0.99,
        t_min: float = 0.5,
        t_max: float = 0.95,
        per_scale: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"threshold beta must be in [0, 1], got {beta}.")
        if t_min > t_max:
            raise ValueError(f"threshold clip range is empty: [{t_min}, {t_max}].")
        self.num_scales = int(num_scales)
        self.per_scale = bool(per_scale)
        self.beta = float(beta)
        self.t_min = float(t_min)
        self.t_max = float(t_max)
        rows = self.num_scales if self.per_scale else 1
        self.register_buffer("thresholds", torch.full((rows, int(num_classes)), 1.0 / num_classes))

    def _row(self, scale: int) -> torch.Tensor:
        return self.thresholds[scale if self.per_scale else 0]

    def mask(self, prob: torch.Tensor, scale: int) -> torch.Tensor:
        """``(B, C, *sp)`` teacher probabilities at scale ``scale`` (0-based) -> ``(B, 1, *sp)`` bool mask."""
        confidence, pseudo = prob.max(dim=1, keepdim=True)
        return confidence > self._row(scale).to(prob)[pseudo]

    @torch.no_grad()
    def update(self, student_prob: torch.Tensor, pseudo_label: torch.Tensor, scale: int) -> None:
        """Eq. 8-9 at scale ``scale``: ``student_prob`` ``(B, C, *sp)``, ``pseudo_label`` ``(B, 1, *sp)``."""
        if not self.per_scale and scale != self.num_scales - 1:
            return
        selector = one_hot(pseudo_label, student_prob.shape[1]).to(student_prob)
        dims = [0] + list(range(2, student_prob.dim()))
        count = selector.sum(dim=dims)
        p_avg = (selector * student_prob.detach()).sum(dim=dims) / count.clamp_min(1.0)
        row = self._row(scale)
        updated = (self.beta * row + (1.0 - self.beta) * p_avg.to(row)).clamp(self.t_min, self.t_max)
        row.copy_(torch.where(count.to(row.device) > 0, updated, row))


class DuCiSCMethod(StudentTeacherMethod):
    """A deep-supervised V-Net student (:class:`~bundle.networks.peer.DeepSupervisedVNet`) and its EMA teacher.

    One iteration at ``t`` (docs/methods/ducisc.md), with ``S = 4`` heads ``O^s`` and taps ``F^s`` (coarse to fine):

    1. student on ``x_l`` -> ``O_l^s, F_l^s``; ``y^s`` = nearest-resized ground truth;
    2. (after the warm-up) teacher, no gradient, train mode, on the same ``x_u``: ``q^s = softmax(O_t^s)``,
       ``ybar^s = argmax q^s``, certainty masks ``M^s`` from the self-aware thresholds
       (:class:`SelfAwareThresholds`); student on ``x_u`` -> ``O_u^s, F_u^s``;
    3. mixup of pair ``k`` (labeled ``k``, unlabeled ``k``), ``sigma_k ~ U(mix_low, mix_high)`` (Eq. 5) with the
       full-resolution ``ybar^4``; student on ``x_mix`` -> ``O_m^s, F_m^s``; ``y_mix^s`` = trilinear resize;
    4. terms (unweighted; :class:`~bundle.losses.ducisc.DeepSupervisedCEDiceLoss` is ``1/2 [mean_s CE + mean_s
       Dice]``):

       * ``sup`` = CE/Dice of ``O_l^s`` against ``y^s`` (section 1.4 (a));
       * ``cs_ulb`` = CE/Dice of ``O_u^s`` against ``ybar^s`` on ``M^s`` (Eq. 10, first line);
       * ``cs_mix`` = KL (or soft CE)/Dice of ``O_m^s`` against ``y_mix^s`` on the unlabeled partner's ``M^s``
         (Eq. 10, second line);
       * ``proto_ulb`` = prototype alignment of ``(F_l, y)`` with ``(F_u, ybar)`` (Eq. 2-4);
       * ``proto_mix`` = the same for ``(F_l, y)`` with ``(F_m, y_mix)`` (Eq. 6-7);

    5. threshold update from the student's detached ``softmax(O_u^s)`` and ``ybar^s`` (Eq. 8-9; it affects the next
       iteration); after the optimizer step the EMA update of the teacher (``alpha = 0.99``).

    With ``normalize_by_value`` (released code, default) each term is passed through
    :func:`~bundle.losses.ducisc.normalize_by_value` (gradient ``lambda grad L / L``, value ``L``); without it the
    total is the paper's Eq. 11 ``L_sup + l1 L_proto^ulb + l2 L_proto^mix + l3 L_cs^ulb + l4 L_cs^mix``. Before
    ``warmup_iters`` only ``sup`` is active (code; the paper is silent).

    Args:
        student: a :class:`~bundle.networks.peer.DeepSupervisedVNet` (anything with ``forward_deep`` returning four
            coarse-to-fine logits and taps and a ``head`` with ``out_channels``).
        loss_weights: weights of ``("sup", "cs_ulb", "cs_mix", "proto_ulb", "proto_mix")`` (paper: 1, 0.3, 0.1, 0.1,
            0.1).
        max_iterations: total iterations.
        warmup_iters: supervised-only iterations; ``None`` (default): ``min(2000, max_iterations // 3)``, the
            released 2000 for runs of 6000 iterations or more.
        normalize_by_value: per-term normalisation by the detached value (code) or the plain weighted sum (paper).
        threshold_beta: EMA factor ``beta`` of the thresholds (0.99).
        threshold_min, threshold_max: the clip of the thresholds (code: 0.5, 0.95; paper: none).
        threshold_per_scale: one threshold row per head (code) or one shared row (paper).
        proto_batch_mean: batch-averaged prototypes compared by MSE (code) or per-pair ``(1/C) sum ||.||^2`` (paper).
        mix_ce_as_kl: the mixed "CE" as KL divergence (code) or soft-target CE (paper's wording).
        mix_low, mix_high: the range of the mixup ratio (0.25, 0.75).
        num_proto_levels: how many feature levels enter the prototype losses, coarsest first (4).
        student_teacher_args: ``ema_decay`` (0.99), ``ema_buffers``, ``teacher_train_mode`` (True, as the released
            code), ``infer_net`` (``"student"``): see :class:`~bundle.methods.ema.StudentTeacherMethod`.
    """

    term_names = ("sup", "cs_ulb", "cs_mix", "proto_ulb", "proto_mix")
    stateful_terms = True  # the self-aware thresholds (EMA buffers)
    unlabeled_terms = UNLABELED_TERMS

    def __init__(
        self,
        student: nn.Module,
        loss_weights: Mapping[str, float],
        max_iterations: int,
        warmup_iters: Optional[int] = None,
        normalize_by_value: bool = True,
        threshold_beta: float = 0.99,
        threshold_min: float = 0.5,
        threshold_max: float = 0.95,
        threshold_per_scale: bool = True,
        proto_batch_mean: bool = True,
        mix_ce_as_kl: bool = True,
        mix_low: float = 0.25,
        mix_high: float = 0.75,
        num_proto_levels: int = 4,
        **student_teacher_args: Any,
    ) -> None:
        super().__init__(student, loss_weights, max_iterations, **student_teacher_args)
        if not 0.0 <= mix_low <= mix_high <= 1.0:
            raise ValueError(f"need 0 <= mix_low <= mix_high <= 1, got {mix_low}, {mix_high}.")
        self.num_classes = int(student.head.out_channels)
        self.num_scales = len(getattr(student, "ds_heads", ())) + 1
        if not 1 <= num_proto_levels <= self.num_scales:
            raise ValueError(f"num_proto_levels must be in [1, {self.num_scales}], got {num_proto_levels}.")
        self.warmup_iters = min(2000, max_iterations // 3) if warmup_iters is None else int(warmup_iters)
        self.normalize = bool(normalize_by_value)
        self.mix_low, self.mix_high = float(mix_low), float(mix_high)
        self.num_proto_levels = int(num_proto_levels)
        self.thresholds = SelfAwareThresholds(
            self.num_scales, self.num_classes, threshold_beta, threshold_min, threshold_max, threshold_per_scale
        )
        self.supervised = DeepSupervisedCEDiceLoss("ce")
        self.consistency = DeepSupervisedCEDiceLoss("ce")
        self.mix_consistency = DeepSupervisedCEDiceLoss("kl" if mix_ce_as_kl else "ce")
        self.prototype = PrototypeAlignmentLoss(batch_mean=proto_batch_mean)

    def term_weights(self, iteration: int) -> Dict[str, float]:
        """The config weights; before ``warmup_iters`` only ``sup``."""
        weights = dict(self.loss_weights)
        if iteration < self.warmup_iters:
            weights.update({name: 0.0 for name in UNLABELED_TERMS})
        return weights

    def _student(self, images: torch.Tensor):
        logits, taps = self.student.forward_deep(images)
        return [z.float() for z in logits], [f.float() for f in taps]  # every term in float32, also under AMP

    def terms(
        self, labeled_image: Tensor, label: Tensor, unlabeled_image: Optional[Tensor], iteration: int, active: Weights
    ) -> Terms:
        """See :meth:`SSLMethod.terms`; returns the unweighted active terms (normalised if configured)."""
        levels = slice(0, self.num_proto_levels)
        logits_l, taps_l = self._student(labeled_image)
        targets_l = [one_hot(resize_label(label, z.shape[2:]), self.num_classes) for z in logits_l]
        losses: Dict[str, torch.Tensor] = {}
        if "sup" in active:
            losses["sup"] = self.supervised(logits_l, targets_l)
        if unlabeled_image is not None:
            teacher_logits, _ = self.teacher_forward(unlabeled_image, "forward_deep")
            teacher_prob = [torch.softmax(z.float(), dim=1) for z in teacher_logits]
            pseudo = [q.argmax(dim=1, keepdim=True) for q in teacher_prob]
            pseudo_1hot = [one_hot(y, self.num_classes) for y in pseudo]
            masks = [self.thresholds.mask(q, s) for s, q in enumerate(teacher_prob)]
            logits_u, taps_u = self._student(unlabeled_image)
            if "cs_ulb" in active:
                losses["cs_ulb"] = self.consistency(logits_u, pseudo_1hot, masks)
            if "proto_ulb" in active:
                losses["proto_ulb"] = self.prototype(
                    taps_l[levels], targets_l[levels], taps_u[levels], pseudo_1hot[levels]
                )
            if any(name in active for name in MIXED_TERMS):
                self._mixed_terms(
                    labeled_image, label, unlabeled_image, pseudo_1hot[-1], masks, taps_l, targets_l, active, losses
                )
            for s in range(self.num_scales):
                self.thresholds.update(torch.softmax(logits_u[s].detach(), dim=1), pseudo[s], s)
        if self.normalize:
            losses = {name: normalize_by_value(value) for name, value in losses.items()}
        return losses

    def _mixed_terms(
        self,
        labeled_image: torch.Tensor,
        label: torch.Tensor,
        unlabeled_image: torch.Tensor,
        pseudo_1hot: torch.Tensor,
        masks: List[torch.Tensor],
        taps_l: List[torch.Tensor],
        targets_l: List[torch.Tensor],
        active: Mapping[str, float],
        losses: Dict[str, torch.Tensor],
    ) -> None:
        """Mixup of the pairs (Eq. 5) and the ``cs_mix`` / ``proto_mix`` terms, added to ``losses``."""
        pairs = min(labeled_image.shape[0], unlabeled_image.shape[0])
        sigma = torch.empty(pairs, device=labeled_image.device).uniform_(self.mix_low, self.mix_high)
        mixed, soft_label = mixup(
            labeled_image[:pairs],
            one_hot(label[:pairs], self.num_classes),
            unlabeled_image[:pairs],
            pseudo_1hot[:pairs],
            sigma,
        )
        logits_m, taps_m = self._student(mixed)
        targets_m = [resize_soft(soft_label, z.shape[2:]) for z in logits_m]
        if "cs_mix" in active:
            losses["cs_mix"] = self.mix_consistency(logits_m, targets_m, [m[:pairs] for m in masks])
        if "proto_mix" in active:
            levels = slice(0, self.num_proto_levels)
            losses["proto_mix"] = self.prototype(taps_l[levels], targets_l[levels], taps_m[levels], targets_m[levels])
