"""DuCiSC loss terms (Wu, Wang, Cui, IEEE TMI 2025; docs/methods/ducisc.md).

Shapes: ``B`` batch, ``C`` classes (class 0 = background), ``Z_s`` feature width at level ``s``, spatial ``*sp``.
Every per-scale list is ordered coarse to fine (``s = 1 .. S``, the last one full resolution), as returned by
:meth:`bundle.networks.peer.DeepSupervisedVNet.forward_deep`.

Differences from the released code, all deliberate: an empty selection (no confident voxel at a scale, an absent
class in a prototype) leaves that scale or level out instead of producing NaN that the training loop then drops;
the per-term normalisation by the detached value keeps the term's *value* (so logs show ``L``, not 1) while
giving the same gradient ``grad L / L`` (:func:`normalize_by_value`); the code is binary-only, these modules take
any ``C >= 2`` (for ``C = 2`` they reduce to the code's formulas).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from bundle.losses.functional import check_option, masked_cross_entropy, soft_dice_loss

#: how the soft "CE" of the mixed consistency is computed: the released code's KL divergence, or soft-target CE.
MIX_CE_MODES = ("kl", "ce")


def normalize_by_value(loss: torch.Tensor) -> torch.Tensor:
    """``L / sg(L) + sg(L) - 1``: the value of ``L`` with the gradient ``grad L / L`` (docs/methods/ducisc.md, Eq.
    DC-7).

    The released code adds ``lambda L / sg(L)`` (value ``lambda``); the optimiser step is the same here, but the
    term still *reads* ``L`` in logs. A term that is exactly 0 or not finite is returned unchanged (the code drops
    such terms; ours never produce NaN, and a 0 carries no gradient either way).
    """
    value = loss.detach()
    if not bool(torch.isfinite(value)) or float(value) == 0.0:
        return loss
    return loss / value + (value - 1.0)


def resize_label(label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of ``(B, 1, *sp)`` integer classes to ``size`` (the code's GT per head)."""
    if tuple(label.shape[2:]) == tuple(size):
        return label
    return F.interpolate(label.float(), size=tuple(size), mode="nearest").long()


def resize_soft(target: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear resize (``align_corners=False``) of a soft target ``(B, C, *sp)``; class sums stay 1."""
    if tuple(target.shape[2:]) == tuple(size):
        return target
    return F.interpolate(target, size=tuple(size), mode="trilinear", align_corners=False)


class DeepSupervisedCEDiceLoss(nn.Module):
    """``L = 1/2 [ mean_s CE_s + mean_s Dice_s ]`` over the scales (docs/methods/ducisc.md, Eq. DC-1, DC-4, DC-5; Eq.
    10).

    At scale ``s`` with logits ``O^s`` ``(B, C, *sp_s)``, soft or one-hot target ``t^s`` ``(B, C, *sp_s)`` and an
    optional mask ``M^s`` ``(B, 1, *sp_s)`` (all voxels when ``None``), ``n = sum M``:

    * ``ce_mode="ce"``: ``CE_s = (1/n) sum_v M(v) (-sum_c t_c log p_c)`` (standard CE for one-hot targets);
      ``ce_mode="kl"`` (the code's mixed term): ``CE_s = 1/(n C) sum_v M(v) sum_c t_c (log t_c - log p_c)``.
    * ``Dice_s = mean_{c >= 1} [1 - (2 sum M p_c t_c + eps) / (sum M p_c + sum M t_c + eps)]``, sums over the whole
      batch (batch-global, linear denominators, ``eps = 1e-8``); for ``C = 2`` the code's binary Dice.

    A scale with an empty mask is left out of both means (the code's NaN); if every scale is empty the loss is 0
    (with a graph to the logits).

    Args (forward):
        logits: list of ``(B, C, *sp_s)``.
        targets: list of ``(B, C, *sp_s)`` class distributions (one-hot or soft).
        masks: list of ``(B, 1, *sp_s)`` bool masks, or ``None``.
    """

    def __init__(self, ce_mode: str = "ce", eps: float = 1e-8) -> None:
        super().__init__()
        check_option("ce_mode", ce_mode, MIX_CE_MODES)
        self.ce_mode = ce_mode
        self.eps = eps

    def forward(
        self,
        logits: Sequence[torch.Tensor],
        targets: Sequence[torch.Tensor],
        masks: Optional[Sequence[torch.Tensor]] = None,
    ) -> torch.Tensor:
        ce_terms: List[torch.Tensor] = []
        dice_terms: List[torch.Tensor] = []
        for s, (z, target) in enumerate(zip(logits, targets)):
            if z.shape != target.shape:
                raise ValueError(f"scale {s}: logits {list(z.shape)} and target {list(target.shape)} differ.")
            weight = torch.ones_like(z[:, :1]) if masks is None else masks[s].to(z)
            count = weight.sum()
            if float(count) == 0.0:
                continue
            log_p = F.log_softmax(z, dim=1)
            if self.ce_mode == "ce":
                ce = masked_cross_entropy(log_p, target, weight[:, 0])
            else:
                kl = (torch.xlogy(target, target) - target * log_p).sum(dim=1, keepdim=True)
                ce = (kl * weight).sum() / (count * z.shape[1])
            dice = soft_dice_loss(
                log_p.exp(), target, self.eps, weight, batch=True, include_background=False, split_denominator=True
            )
            ce_terms.append(ce)
            dice_terms.append(dice)
        if not ce_terms:
            return sum(z.sum() for z in logits) * 0.0
        return 0.5 * (torch.stack(ce_terms).mean() + torch.stack(dice_terms).mean())


def masked_average_prototypes(features: torch.Tensor, weights: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Masked average pooling, Eq. (2), (3), (6): ``p_b^c = sum_v w_b^c(v) F_b(v) / sum_v w_b^c(v)``.

    Args:
        features: ``(B, Z, *sp)``.
        weights: ``(B, C, *sp)`` class weights (one-hot masks, or the soft mixed label), same spatial size.

    Returns:
        ``(prototypes (B, C, Z), mass (B, C))``; a class with zero mass has a zero prototype (check ``mass``).
    """
    if features.shape[2:] != weights.shape[2:] or features.shape[0] != weights.shape[0]:
        raise ValueError(f"features {list(features.shape)} and weights {list(weights.shape)} do not match.")
    with torch.autocast(device_type=features.device.type, enabled=False):  # sums over all voxels: no fp16
        w = weights.flatten(2).float()
        features = features.float()
        mass = w.sum(dim=-1)
        summed = torch.einsum("bcv,bzv->bcz", w, features.flatten(2))
    return summed / mass.clamp_min(torch.finfo(features.dtype).tiny).unsqueeze(-1), mass


class PrototypeAlignmentLoss(nn.Module):
    """Cross-image prototype consistency ``L_proto`` (Eq. 4 and 7; docs/methods/ducisc.md, Eq. DC-6).

    For levels ``s`` with features ``F_a^s``, ``F_b^s`` ``(B, Z_s, *sp_s)`` and class weights ``w_a^s``, ``w_b^s``
    ``(B, C, *sp_s)``, prototypes come from :func:`masked_average_prototypes` (student features on both sides,
    gradient through both).

    * ``batch_mean=True`` (released code): ``P^s = mean_b p_b^s`` ``(C, Z_s)`` on each side and
      ``L = mean_s mean_{c,z} (P_a^s - P_b^s)^2`` (MSE over ``C x Z_s`` entries). A level where any sample on either
      side has an empty class is left out (the code's NaN level).
    * ``batch_mean=False`` (paper): per pair ``k`` (``a_k`` with ``b_k``), ``L_k = (1/C) sum_s sum_c
      ||p_a^{c,s} - p_b^{c,s}||_2^2`` over the levels where both samples have every class; ``L = mean_k L_k``.

    If no level is usable the loss is 0 (with a graph to the features).
    """

    def __init__(self, batch_mean: bool = True) -> None:
        super().__init__()
        self.batch_mean = bool(batch_mean)

    def forward(
        self,
        features_a: Sequence[torch.Tensor],
        weights_a: Sequence[torch.Tensor],
        features_b: Sequence[torch.Tensor],
        weights_b: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        zero = sum(f.sum() for f in features_a) * 0.0 + sum(f.sum() for f in features_b) * 0.0
        pairs = min(features_a[0].shape[0], features_b[0].shape[0])
        terms: List[torch.Tensor] = []
        pair_terms = [[] for _ in range(pairs)]
        for fa, wa, fb, wb in zip(features_a, weights_a, features_b, weights_b):
            proto_a, mass_a = masked_average_prototypes(fa, wa)
            proto_b, mass_b = masked_average_prototypes(fb, wb)
            if self.batch_mean:
                if bool((mass_a > 0).all()) and bool((mass_b > 0).all()):
                    terms.append(F.mse_loss(proto_a.mean(dim=0), proto_b.mean(dim=0)))
                continue
            for k in range(pairs):
                if bool((mass_a[k] > 0).all()) and bool((mass_b[k] > 0).all()):
                    pair_terms[k].append((proto_a[k] - proto_b[k]).pow(2).sum() / proto_a.shape[1])
        if not self.batch_mean:
            terms = [torch.stack(t).sum() for t in pair_terms if t]
        return torch.stack(terms).mean() if terms else zero
