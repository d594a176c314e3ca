"""Consistency terms between the two subnets: the masked "cross reliable" MSE (CR) and the cosine regulariser."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bundle.losses.functional import check_label, check_option, one_hot

#: CR mask rules: ``"xor"`` (released code) or ``"or"`` (J's text).
CR_MASK_RULES = ("xor", "or")


class MaskedConsistencyLoss(nn.Module):
    """CR, the masked MSE against the **ground truth** on labeled data (J eqs 4-6; docs/methods/dual_network.md §2).

    For each net X: ``yhat_X = argmax_c p_X``, ``m_X = max_c p_X`` and the confident-foreground map
    ``F_X = [yhat_X != 0] and [m_X >= tau]`` ("foreground" = any non-background class, which for ``C = 2`` is the
    code's ``yhat_X = 1``). The mask is ``M = F_A xor F_B`` (``mask_rule="xor"``, released code: exactly one net is
    confident about foreground) or ``M = F_A or F_B`` (``"or"``, J's text). Then

        ``CR_X = sum_v M_v sum_{c>=1} (p_X,c,v - [y_v = c])^2 / (sum_v M_v + eps)``

    which for ``C = 2`` is the code's ``sum M (p_X,1 - y)^2 / (sum M + 1e-16)``. The module returns
    ``CR_A + CR_B``; the config weight (``lambda = 0.5``) multiplies this sum. The mask carries no gradient; each
    ``CR_X`` sends gradient to net X only.

    Args (forward):
        logits_a, logits_b: ``(B, C, *spatial)`` logits of the two nets on the labeled sub-batch.
        label: ``(B, 1, *spatial)`` integer class indices.

    Returns:
        scalar ``CR_A + CR_B`` (0 when the mask is empty).
    """

    def __init__(self, threshold: float = 0.6, mask_rule: str = "xor", eps: float = 1e-16) -> None:
        super().__init__()
        check_option("mask_rule", mask_rule, CR_MASK_RULES)
        self.threshold = threshold
        self.mask_rule = mask_rule
        self.eps = eps

    def _confident_foreground(self, prob: torch.Tensor) -> torch.Tensor:
        confidence, prediction = prob.detach().max(dim=1)
        return (prediction != 0) & (confidence >= self.threshold)

    def forward(self, logits_a: torch.Tensor, logits_b: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        check_label(logits_a, label)
        prob_a, prob_b = torch.softmax(logits_a, dim=1), torch.softmax(logits_b, dim=1)
        fg_a, fg_b = self._confident_foreground(prob_a), self._confident_foreground(prob_b)
        mask = (fg_a ^ fg_b) if self.mask_rule == "xor" else (fg_a | fg_b)
        mask = mask.float()
        target = one_hot(label, prob_a.shape[1], prob_a.dtype)
        denominator = mask.sum() + self.eps
        total = prob_a.new_zeros(())
        for prob in (prob_a, prob_b):
            squared_error = ((prob[:, 1:] - target[:, 1:]) ** 2).sum(dim=1)
            total = total + (mask * squared_error).sum() / denominator
        return total


class CosineConsistencyLoss(nn.Module):
    """``L_reg = mean_v [1 - cos(p_A,v, p_B,v)]`` (C eqs 5-6; docs/methods/dual_network.md §3; not in J).

    The cosine is taken over the class vector of softmax probabilities (``eps=1e-8``). Neither side is detached,
    so both nets receive gradient; the released code uses it with weight 1 and no ramp.

    Args (forward):
        logits_a, logits_b: ``(B, C, *spatial)`` logits (the released code uses the full labeled + unlabeled batch).

    Returns:
        scalar in ``[0, 1]`` for probabilities.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
        prob_a, prob_b = torch.softmax(logits_a, dim=1), torch.softmax(logits_b, dim=1)
        return (1.0 - F.cosine_similarity(prob_a, prob_b, dim=1, eps=self.eps)).mean()
