"""PGL, the prototype-guided contrastive loss on decoder features of the unlabeled sub-batch."""

from __future__ import annotations

from itertools import combinations
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from bundle.losses.dual_network.reliability import RELIABILITY_RULES, reliable_voxels
from bundle.losses.functional import check_option, class_argmax


def normalized_distance(u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``d(u, c) = || u / |u| - c / |c| ||_2`` over the last dimension (``= sqrt(2 - 2 cos)``); broadcasts.

    A zero vector normalises to zero (``F.normalize``'s eps). Decoder features come out of a ReLU (and channel
    dropout), so a feature vector is exactly zero only where every channel's gradient is already blocked.
    """
    return (F.normalize(u, dim=-1) - F.normalize(c, dim=-1)).norm(dim=-1)


class PrototypeContrastiveLoss(nn.Module):
    """PGL (J eqs 16-20, C eqs 10-11; docs/methods/dual_network.md §7): pull uncertain voxel features towards the
    prototype of their predicted class, plus the prototype-to-prototype distance term.

    With ``e`` the features of the net whose features are used (the "own" net; the method picks the current loser,
    docs/methods/dual_network.md §7) and ``yhat`` its argmax:

    1. Reliability (:func:`~bundle.losses.dual_network.reliability.reliable_voxels`): ``"paper"`` (default, J eq 16)
       = both nets agree and both have entropy below their ``percentile``-th percentile; ``"code"`` = the released
       rule (not uncertain in both nets, labelled by the union pseudo-label). Uncertain set ``U`` = not reliable.
    2. Prototypes ``c_k = mean_{v in R, label_v = k} e_v`` for every class ``k`` with reliable voxels (J eq 19), with
       gradient unless ``detach_prototypes`` (the released code computed PGL under no-grad, docs/methods/dual_network.md
       §9 item 1).
    3. Candidates ``U_k = U and [yhat = k]``. For each foreground class ``k >= 1``, ``n_k = floor(sample_fraction
       |U_k|)`` voxels are drawn at random from ``U_k``; from the background ``U_0``, ``min(|U_0|, sum_k n_k)``
       (for ``C = 2``: the code's ``n = floor(|U_f| / 100)`` from each side).
    4. ``L_PGL = sum_k mean_{u in sample_k} d(e_u, c_k) + mean_{k < l} d(c_k, c_l)`` with :func:`normalized_distance`
       (J eq 20; for ``C = 2``: ``mean d(u, c_f) + mean d(u, c_b) + d(c_f, c_b)``). The third term is **added** as
       in the released code: it pulls the prototypes together (J calls it a soft constraint).

    Empty sets (the released code gives NaN there): a class term is skipped when its prototype or its sample
    is empty, the prototype term when fewer than two prototypes exist; when everything is skipped the loss is 0
    (with a graph to the features). For ``C > 2`` every class gets its own prototype and the third term is the mean
    over all prototype pairs.

    Random draws use ``generator`` (a CPU generator) if given, else the global CPU torch RNG, so a fixed seed
    reproduces them on any device.

    Differences from the released code (docs/methods/dual_network.md §9, items 1, 2, 14): entropies come from
    probabilities (not logits), the loss carries gradient, the default reliability is J's agreement rule, and empty sets
    give no NaN.

    Args (forward):
        features: ``(B, F, *spatial)`` decoder features of the own net (after dropout).
        own_logits: ``(B, C, *spatial)`` logits of the net the features come from.
        other_logits: ``(B, C, *spatial)`` logits of the other net.

    Returns:
        scalar.
    """

    def __init__(
        self,
        percentile: float = 70.0,
        reliability: str = "paper",
        sample_fraction: float = 0.01,
        detach_prototypes: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        check_option("reliability", reliability, RELIABILITY_RULES)
        if not 0.0 < sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in (0, 1], got {sample_fraction}.")
        self.percentile = percentile
        self.reliability = reliability
        self.sample_fraction = sample_fraction
        self.detach_prototypes = detach_prototypes
        self.generator = generator

    def _sample(self, candidates: torch.Tensor, count: int) -> torch.Tensor:
        """``count`` indices drawn without replacement from the flat indices ``candidates``."""
        order = torch.randperm(candidates.numel(), generator=self.generator, device="cpu")[:count]
        return candidates[order.to(candidates.device)]

    def forward(self, features: torch.Tensor, own_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
        num_classes = own_logits.shape[1]
        with torch.no_grad():
            prob_own, prob_other = torch.softmax(own_logits, dim=1), torch.softmax(other_logits, dim=1)
            reliable, reliable_label = reliable_voxels(prob_own, prob_other, self.percentile, self.reliability)
            reliable, reliable_label = reliable.flatten(), reliable_label.flatten()
            uncertain_pred = class_argmax(prob_own).flatten().masked_fill(reliable, -1)
        flat = features.movedim(1, -1).reshape(-1, features.shape[1])  # (V, F)

        prototypes: List[Optional[torch.Tensor]] = []
        for k in range(num_classes):
            members = reliable & (reliable_label == k)
            prototype = flat[members].mean(dim=0) if bool(members.any()) else None
            if prototype is not None and self.detach_prototypes:
                prototype = prototype.detach()
            prototypes.append(prototype)

        candidates = [torch.nonzero(uncertain_pred == k).flatten() for k in range(num_classes)]
        counts = [int(self.sample_fraction * c.numel()) for c in candidates]
        counts[0] = min(candidates[0].numel(), sum(counts[1:]))

        loss = flat[:0].sum()  # 0 with a graph to the features
        for k in range(num_classes):
            prototype = prototypes[k]
            if prototype is not None and counts[k] > 0:
                sample = flat[self._sample(candidates[k], counts[k])]
                loss = loss + normalized_distance(sample, prototype).mean()
        present = [p for p in prototypes if p is not None]
        if len(present) >= 2:
            pair_distances = torch.stack([normalized_distance(p, q) for p, q in combinations(present, 2)])
            loss = loss + pair_distances.mean()
        return loss
