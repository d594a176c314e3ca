"""Pseudo-label terms on the predictions of the two subnets: CPS and EFS (together J's CCE, eq 12) and the
uncertainty-rectified UE term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bundle.losses.dual_network.reliability import UNDEFINED_LABEL, entropy_uncertain, union_pseudo_label
from bundle.losses.functional import check_option, class_argmax, masked_cross_entropy

#: CPS normalisations: mean over all voxels, or over the voxels that carry a confident pseudo-label.
CPS_NORMALIZATIONS = ("all", "confident")
#: EFS targets: the union of both argmaxes (released code) or each net's own argmax (C eq 3).
EFS_TARGETS = ("union", "own")
#: UE targets: the teacher's argmax (released code) or its temperature-sharpened softmax (J/C intent).
UE_TARGETS = ("hard", "soft")


class CrossPseudoSupervisionLoss(nn.Module):
    """Bidirectional CPS with thresholded one-hot pseudo-labels (J eqs 7-8; docs/methods/dual_network.md §5; **absent
    from the released code**).

    ``Y_X,c = sg([p_X,c >= threshold])`` (one-hot where net X is confident, all-zero elsewhere). Net B's labels
    supervise net A and vice versa:

        ``L_CPS = sum_v [-sum_c Y_B,c log p_A,c] / N + sum_v [-sum_c Y_A,c log p_B,c] / N``

    with ``N`` the number of voxels (``normalization="all"``, J's eq 8 form following Chen et al.) or the number
    of voxels with a confident label from the supervising net (``"confident"``, at least 1). Each net receives
    gradient only through its own prediction ``log p_X``. For ``threshold <= 0.5`` a voxel may carry several ones.

    Args (forward):
        logits_a, logits_b: ``(B, C, *spatial)`` logits on the unlabeled sub-batch.

    Returns:
        scalar (0 when no voxel is confident).
    """

    def __init__(self, threshold: float = 0.6, normalization: str = "all") -> None:
        super().__init__()
        check_option("normalization", normalization, CPS_NORMALIZATIONS)
        self.threshold = threshold
        self.normalization = normalization

    def _directed(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        target = (torch.softmax(teacher_logits.detach(), dim=1) >= self.threshold).to(student_logits.dtype)
        loss_sum = -(target * F.log_softmax(student_logits, dim=1)).sum()
        if self.normalization == "all":
            count = target[:, 0].numel()
        else:
            count = max(int(target.amax(dim=1).sum().item()), 1)
        return loss_sum / count

    def forward(self, logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
        return self._directed(logits_a, logits_b) + self._directed(logits_b, logits_a)


class EntropyFilteredLoss(nn.Module):
    """EFS, cross-entropy towards a pseudo-label on the voxels that are not uncertain in both nets (J eqs 9-11,
    C eqs 3-4; docs/methods/dual_network.md §4).

    * ``H_X`` = entropy of the **softmax probabilities** of net X; ``tau_X`` = its ``percentile``-th percentile over
      all voxels of the unlabeled sub-batch (per net).
    * ignored ``<=> (H_A >= tau_A) and (H_B >= tau_B)``.
    * target (stop-grad): ``"union"`` = :func:`~bundle.losses.dual_network.reliability.union_pseudo_label` (the
      code's OR of the foreground argmaxes for ``C = 2``; for ``C > 2`` voxels where the nets predict two different
      foreground classes are also ignored), used for both nets; or ``"own"`` = each net's own argmax (C eq 3).
    * ``L_EFS = sum_{X in {A, B}} sum_{v valid} CE(z_X,v, t_v) / max(#valid, 1)``, CE on the **logits**, with
      gradient to each net.

    Differences from the released code (docs/methods/dual_network.md §9, items 1, 3, 4, 5): CE is applied to logits with
    gradient (the code fed detached probabilities, so EFS never trained anything), entropy is taken on probabilities,
    the mean is the plain mean over valid voxels (no ``V / #valid`` up-scaling), the default percentile is J's 70 (the
    code used 20), and an all-ignored batch gives 0 (with a graph) instead of a division by zero.

    Args (forward):
        logits_a, logits_b: ``(B, C, *spatial)`` logits on the unlabeled sub-batch.

    Returns:
        scalar ``L_EFS,A + L_EFS,B``.
    """

    def __init__(self, percentile: float = 70.0, target: str = "union") -> None:
        super().__init__()
        check_option("target", target, EFS_TARGETS)
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}.")
        self.percentile = percentile
        self.target = target

    def forward(self, logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            prob_a, prob_b = torch.softmax(logits_a, dim=1), torch.softmax(logits_b, dim=1)
            kept = ~(entropy_uncertain(prob_a, self.percentile) & entropy_uncertain(prob_b, self.percentile))
            pred_a, pred_b = class_argmax(prob_a), class_argmax(prob_b)
            if self.target == "union":
                target_a = target_b = union_pseudo_label(pred_a, pred_b)
            else:
                target_a, target_b = pred_a, pred_b
        valid_a = (kept & (target_a != UNDEFINED_LABEL)).float()
        valid_b = (kept & (target_b != UNDEFINED_LABEL)).float()
        loss_a = masked_cross_entropy(
            F.log_softmax(logits_a, dim=1), target_a.clamp(min=0), valid_a, min_denominator=1.0
        )
        loss_b = masked_cross_entropy(
            F.log_softmax(logits_b, dim=1), target_b.clamp(min=0), valid_b, min_denominator=1.0
        )
        return loss_a + loss_b


class UncertaintyRectifiedLoss(nn.Module):
    """UE, pseudo-supervision of the student A by the teacher B weighted by their KL divergence (J eqs 13-15,
    C eqs 7-9; docs/methods/dual_network.md §6).

    Per voxel, with ``p_S = softmax(z_A)`` and the detached teacher ``p_T = softmax(sg(z_B))``:

    * ``KL_v = sum_c p_T,c (log p_T,c - log p_S,c)``, i.e. ``KL(teacher || student)`` at temperature 1;
    * ``CE_v = -log p_S,yhat`` with ``yhat = argmax z_B`` (``target="hard"``, released code, where the temperature
      has no effect), or ``CE_v = -sum_c softmax(sg(z_B) / T)_c log p_S,c`` (``"soft"``, J's "sharpened" intent,
      where ``T`` matters);
    * ``L_UE = mean_v[exp(-KL_v) CE_v] + mean_v[KL_v]``; the weight ``exp(-KL)`` is not detached.

    Only the student receives gradient. The released code applies it to the full labeled + unlabeled batch.

    Args (forward):
        student_logits: ``(B, C, *spatial)`` logits of net A.
        teacher_logits: ``(B, C, *spatial)`` logits of net B (detached here).

    Returns:
        scalar.
    """

    def __init__(self, target: str = "hard", temperature: float = 0.5) -> None:
        super().__init__()
        check_option("target", target, UE_TARGETS)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.target = target
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        teacher_logits = teacher_logits.detach()
        log_student = F.log_softmax(student_logits, dim=1)
        log_teacher = F.log_softmax(teacher_logits, dim=1)
        kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1)
        if self.target == "hard":
            ce = -log_student.gather(1, class_argmax(teacher_logits, keepdim=True)).squeeze(1)
        else:
            ce = -(torch.softmax(teacher_logits / self.temperature, dim=1) * log_student).sum(dim=1)
        return (torch.exp(-kl) * ce).mean() + kl.mean()
