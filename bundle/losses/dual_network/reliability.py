"""Voxel reliability from the two subnets' predictions, shared by EFS (:mod:`bundle.losses.dual_network.pseudo`) and
PGL (:mod:`bundle.losses.dual_network.prototype`).

Every function here works on *detached* probabilities and returns masks or labels without gradient. Shapes:
probabilities ``(B, C, *spatial)``, masks and labels ``(B, *spatial)``. ``C >= 2``; class 0 is the background.
"""

from __future__ import annotations

from typing import Tuple

import torch

from bundle.losses.functional import check_option, class_argmax, softmax_entropy

#: value of a pseudo-label that is undefined (both nets predict different non-background classes, ``C > 2`` only).
UNDEFINED_LABEL = -1
#: reliability rules of :func:`reliable_voxels`.
RELIABILITY_RULES = ("paper", "code")
#: eps inside the entropy's logarithm (as in the released code).
ENTROPY_EPS = 1e-10


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile (``0 <= q <= 100``) of all elements of ``values`` with linear interpolation
    (numpy's default). Selection-based (``torch.kthvalue``: the same two order statistics as a full sort, 4x faster on
    a 64x64x32 batch), so unlike ``torch.quantile`` there is no limit on the number of elements."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}.")
    flat = values.detach().flatten()
    position = q / 100.0 * (flat.numel() - 1)
    low = int(position)
    high = min(low + 1, flat.numel() - 1)
    lower, upper = flat.kthvalue(low + 1).values, flat.kthvalue(high + 1).values
    return lower + (position - low) * (upper - lower)


def entropy_uncertain(prob: torch.Tensor, q: float) -> torch.Tensor:
    """``H >= tau`` per voxel, with ``H = -sum_c p_c ln(p_c + 1e-10)`` the entropy of the softmax **probabilities**
    (:func:`~bundle.losses.functional.softmax_entropy`; the released code's PGL variant fed raw logits, giving NaN;
    natural log, docs/methods/dual_network.md Eq. D-5: the base is irrelevant because ``tau`` is a percentile) and
    ``tau`` the ``q``-th percentile of ``H`` over **all** voxels of ``prob`` (the whole sub-batch; J eq 10).
    ``(B, C, *spatial)`` -> bool ``(B, *spatial)``."""
    entropy = softmax_entropy(prob, ENTROPY_EPS)
    return entropy >= percentile(entropy, q)


def union_pseudo_label(pred_a: torch.Tensor, pred_b: torch.Tensor) -> torch.Tensor:
    """Pseudo-label from the two argmax maps (docs/methods/dual_network.md §4, "union").

    Where the nets agree, their class; where exactly one predicts background, the other's (non-background) class;
    where they predict two different non-background classes (``C > 2`` only), :data:`UNDEFINED_LABEL`.
    For ``C = 2`` this is the released code's bitwise OR of the foreground argmaxes. Long ``(B, *spatial)``.
    """
    label = torch.maximum(pred_a, pred_b)
    conflict = (pred_a != pred_b) & (pred_a != 0) & (pred_b != 0)
    return label.masked_fill(conflict, UNDEFINED_LABEL)


def reliable_voxels(
    prob_a: torch.Tensor, prob_b: torch.Tensor, q: float, rule: str = "paper"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reliable-voxel mask ``R`` and its class label, for prototypes (J eqs 16-18).

    * ``"paper"`` (J eq 16): ``R = [argmax p_A = argmax p_B] and [H_A < tau_A] and [H_B < tau_B]``; label = the
      agreed class.
    * ``"code"`` (released code): ``R`` = not uncertain in **both** nets (the EFS "not ignored" set); label = the
      :func:`union_pseudo_label` (``R`` also excludes its undefined voxels, which only exist for ``C > 2``).

    ``tau_X`` is the ``q``-th percentile of net X's entropy over the sub-batch. Returns bool ``R`` and long label,
    both ``(B, *spatial)``; the label is meaningful only inside ``R``.
    """
    check_option("reliability rule", rule, RELIABILITY_RULES)
    uncertain_a, uncertain_b = entropy_uncertain(prob_a, q), entropy_uncertain(prob_b, q)
    pred_a, pred_b = class_argmax(prob_a), class_argmax(prob_b)
    if rule == "paper":
        return (pred_a == pred_b) & ~uncertain_a & ~uncertain_b, pred_a
    label = union_pseudo_label(pred_a, pred_b)
    return ~(uncertain_a & uncertain_b) & (label != UNDEFINED_LABEL), label
