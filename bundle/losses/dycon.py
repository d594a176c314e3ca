"""DyCON loss terms (Assefa et al., CVPR 2025; docs/methods/dycon.md).

Shapes: ``B`` batch, ``C`` classes (class 0 = background), ``E`` embedding width, ``N = h w d`` tokens of the
embedding grid (one per ``8^3`` input block), spatial ``*sp``.

Deliberate differences from the released code (docs/methods/dycon.md): FeCL's token labels for unlabeled volumes are
the **teacher's** pseudo-labels (the code reads their ground truth: a label leak); FeCL follows the paper's Eq. 3-6
(both focal weights effective, the entropy adjustment on, top-K teacher hard negatives), where the code has an
ineffective negative weight, no entropy weighting and a thresholded ``-log(1 - cos)`` teacher term instead; the
focal weights use the cosine similarity (the paper's ``S = z z / tau`` exceeds 1 for ``tau < 1``, which makes
``(1 - S)^gamma`` undefined for fractional ``gamma``) and act as weights (no gradient through them).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from bundle.losses.functional import check_option, one_hot, softmax_entropy

#: the beta schedules of UnCL: the paper's exponential decay, the code's geometric decay, or a constant.
BETA_SCHEDULES = ("exp_decay", "geometric", "constant")


def uncl_beta(progress: float, schedule: str = "exp_decay", beta_max: float = 1.0, beta_min: float = 0.1, decay=0.3):
    """UnCL's ``beta`` at training progress ``progress = t / T`` in ``[0, 1]`` (docs/methods/dycon.md).

    * ``"exp_decay"`` (paper): ``max(beta_min, beta_max exp(-decay progress))``; with 1.0, 0.1, 0.3 it falls from 1.0
      to ``e^{-0.3} = 0.741`` (it never reaches ``beta_min``).
    * ``"geometric"`` (code, with ``beta_max=5, beta_min=0.5``): ``beta_max (beta_min / beta_max)^progress``.
    * ``"constant"``: ``beta_max``.
    """
    check_option("beta schedule", schedule, BETA_SCHEDULES)
    progress = min(max(float(progress), 0.0), 1.0)
    if schedule == "exp_decay":
        return max(beta_min, beta_max * math.exp(-decay * progress))
    if schedule == "geometric":
        return beta_max * (beta_min / beta_max) ** progress
    return float(beta_max)


class UncertaintyAwareConsistencyLoss(nn.Module):
    """UnCL, Eq. (1): ``mean_v [ D(v) / (exp(beta H_s(v)) + exp(beta H_t(v))) + beta (H_s(v) + H_t(v)) ]``.

    ``D(v) = sum_c (p_s,c - p_t,c)^2`` (squared error summed over classes, the code's "MSE"), ``H(v) = -sum_c p_c
    ln(p_c + eps)`` with the released code's ``eps = 1e-6`` (:func:`~bundle.losses.functional.softmax_entropy`).
    Gradient flows through ``p_s`` and ``H_s`` (in the weight and the regulariser); the teacher terms are constants
    (``beta H_t`` only shifts the value). The mean is over ``B x *sp``.

    Args (forward):
        student_logits: ``(B, C, *sp)``.
        teacher_prob: ``(B, C, *sp)`` teacher probabilities (no gradient).
        beta: the current ``beta`` (:func:`uncl_beta`).
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, student_logits: torch.Tensor, teacher_prob: torch.Tensor, beta: float) -> torch.Tensor:
        if student_logits.shape != teacher_prob.shape:
            raise ValueError(f"student {list(student_logits.shape)} and teacher {list(teacher_prob.shape)} differ.")
        p_s = torch.softmax(student_logits, dim=1)
        p_t = teacher_prob.detach()
        h_s, h_t = softmax_entropy(p_s, self.eps, keepdim=True), softmax_entropy(p_t, self.eps, keepdim=True)
        distance = (p_s - p_t).pow(2).sum(dim=1, keepdim=True)
        weight = torch.exp(beta * h_s) + torch.exp(beta * h_t)
        return (distance / weight + beta * (h_s + h_t)).mean()


def token_labels(class_map: torch.Tensor, grid, num_classes: int) -> torch.Tensor:
    """Token labels: the majority class of each block, ``(B, 1, *sp)`` integer classes -> ``(B, N)``.

    The one-hot map is average-pooled to ``grid`` (the ``8^3`` blocks of the embedding grid) and the arg-max taken;
    for ``C = 2`` that is "foreground fraction > 0.5" (a tie goes to the background; docs/methods/dycon.md §2).
    """
    return F.adaptive_avg_pool3d(one_hot(class_map, num_classes), tuple(grid)).argmax(dim=1).flatten(1)


def gambling_entropy(prob: torch.Tensor, grid, temperature: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """Eq. (5) and ``H_gs``: ``p_h = softmax(log p / T + (1 - max_c p))`` (the added term is the same for every class
    and cancels: ``p_h = p^{1/T} / sum p^{1/T}``), its entropy normalised by ``log C``, averaged over each block.

    ``(B, C, *sp)`` -> ``(B, N)`` in ``[0, 1]``, detached.
    """
    with torch.no_grad():
        p_h = torch.softmax(torch.log(prob.float() + eps) / temperature, dim=1)
        entropy = softmax_entropy(p_h, eps, keepdim=True) / math.log(prob.shape[1])
        return F.adaptive_avg_pool3d(entropy, tuple(grid)).flatten(1).clamp(0.0, 1.0)


class FocalEntropyContrastiveLoss(nn.Module):
    """FeCL, Eq. (3)-(6), within each volume over its ``N`` tokens (docs/methods/dycon.md).

    With ``z_i`` the L2-normalised student embeddings, ``c_ik = z_i . z_k``, ``S_ik = c_ik / tau``, positives
    ``P(i) = {k != i: y_k = y_i}``, negatives ``N(i) = {q: y_q != y_i}``:

    * ``F+_ik = (1 - c_ik)^gamma exp(H_i)`` (``H_i`` the anchor block's normalised gambling-softmax entropy,
      :func:`gambling_entropy`; 1 without the entropy adjustment), ``F-_iq = max(c_iq, 0)^gamma``; without ``focal``
      both are 1 (plain SupCon weights). Weights, no gradient.
    * Top-K teacher hard negatives (Eq. 6): ``h_i = (1/K_i) sum_{l in TopK} exp(z_i . zt_l / tau)`` over the
      teacher tokens ``l`` of the same volume with ``y_l != y_i``, ``K_i = min(K, |N(i)|)``; 0 without a teacher or
      with ``top_k = 0``.
    * ``D_ik = exp(S_ik) + sum_{q in N(i)} F-_iq (exp(S_iq) + h_i)`` and
      ``L_i = (1/|P(i)|) sum_{k in P(i)} F+_ik (log D_ik - S_ik)`` (0 for an anchor without positives);
      ``L = mean_{b, i} L_i``.

    Embeddings are normalised, so ``|S| <= 1 / tau`` and no exponential can overflow; ``D_ik >= exp(S_ik) > 0``, so
    the loss is finite for any labels (a volume of one class only has positives and gives ``log(1) = 0`` terms).

    Args:
        temperature: ``tau`` (0.6).
        gamma: focal exponent (paper 0.8, ISLES 0.5; code 2.0).
        top_k: ``K`` of the teacher hard negatives (not given in the paper).
        focal: use the focal weights ``F+``, ``F-``.
        entropy_weight: multiply ``F+`` by ``exp(H_i)`` (the confidence adjustment).

    Args (forward):
        student_embed: ``(B, E, h, w, d)``.
        labels: ``(B, N)`` token labels (teacher pseudo-labels for unlabeled volumes).
        teacher_embed: ``(B, E, h, w, d)`` or ``None``.
        entropy: ``(B, N)`` normalised entropies or ``None``.
    """

    def __init__(
        self,
        temperature: float = 0.6,
        gamma: float = 0.8,
        top_k: int = 5,
        focal: bool = True,
        entropy_weight: bool = True,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}.")
        self.temperature = float(temperature)
        self.gamma = float(gamma)
        self.top_k = int(top_k)
        self.focal = bool(focal)
        self.entropy_weight = bool(entropy_weight)

    def forward(
        self,
        student_embed: torch.Tensor,
        labels: torch.Tensor,
        teacher_embed: Optional[torch.Tensor] = None,
        entropy: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        with torch.autocast(device_type=student_embed.device.type, enabled=False):  # similarities in float32
            return self._loss(student_embed, labels, teacher_embed, entropy)

    def _loss(
        self,
        student_embed: torch.Tensor,
        labels: torch.Tensor,
        teacher_embed: Optional[torch.Tensor],
        entropy: Optional[torch.Tensor],
    ) -> torch.Tensor:
        batch = student_embed.shape[0]
        z_all = F.normalize(student_embed.float().flatten(2), dim=1).transpose(1, 2)  # (B, N, E)
        if labels.shape != z_all.shape[:2]:
            raise ValueError(f"labels {list(labels.shape)} do not match the {list(z_all.shape[:2])} tokens.")
        losses = []
        for b in range(batch):
            z, y = z_all[b], labels[b]
            cos = z @ z.T
            sim = cos / self.temperature
            same = y[:, None] == y[None, :]
            positive = same & ~torch.eye(len(y), dtype=torch.bool, device=y.device)
            negative = ~same
            with torch.no_grad():
                w_pos = (1.0 - cos).clamp_min(0.0).pow(self.gamma) if self.focal else torch.ones_like(cos)
                w_neg = cos.clamp_min(0.0).pow(self.gamma) if self.focal else torch.ones_like(cos)
                if self.entropy_weight and entropy is not None:
                    w_pos = w_pos * torch.exp(entropy[b].float())[:, None]
            hard = torch.zeros_like(sim[:, 0])
            if teacher_embed is not None and self.top_k > 0:
                zt = F.normalize(teacher_embed[b].detach().float().flatten(1), dim=0).T  # (N, E)
                cross = (z @ zt.T / self.temperature).masked_fill(same, float("-inf"))
                k = min(self.top_k, cross.shape[1])
                top = torch.exp(cross.topk(k, dim=1).values)  # exp(-inf) = 0 for missing negatives
                hard = top.sum(dim=1) / negative.sum(dim=1).clamp(max=k).clamp_min(1)
            rest = (negative * w_neg * (torch.exp(sim) + hard[:, None])).sum(dim=1, keepdim=True)  # (N, 1)
            pair = torch.log(torch.exp(sim) + rest) - sim
            per_anchor = (positive * w_pos * pair).sum(dim=1) / positive.sum(dim=1).clamp_min(1)
            losses.append(per_anchor.mean())
        return torch.stack(losses).mean()
