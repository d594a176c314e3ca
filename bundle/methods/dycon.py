"""DyCON (Assefa et al., CVPR 2025): uncertainty-aware consistency (UnCL) and focal entropy-aware contrastive
learning (FeCL) in a mean teacher (docs/methods/dycon.md)."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from bundle.losses.dycon import (
    BETA_SCHEDULES,
    FocalEntropyContrastiveLoss,
    UncertaintyAwareConsistencyLoss,
    gambling_entropy,
    token_labels,
    uncl_beta,
)
from bundle.losses.functional import check_option
from bundle.losses.supervised import SupervisedLoss
from bundle.methods.base import Terms, Weights
from bundle.methods.ema import StudentTeacherMethod

#: terms that need the unlabeled batch.
UNLABELED_TERMS = ("uncl", "fecl")


class DyCONMethod(StudentTeacherMethod):
    """A V-Net student with a projection head (:class:`~bundle.networks.peer.ProjectionVNet`) and its EMA teacher.

    One iteration at ``t`` (docs/methods/dycon.md), ``x = cat(x_l, x_u)``:

    1. student on ``x`` in one call -> logits ``z`` and embeddings ``e`` ``(B, E, H/8, W/8, D/8)``;
    2. teacher, no gradient, train mode, on ``x_u + xi`` (``xi = clip(noise_std N(0, 1), +-noise_clip)``; on all of
       ``x`` when a labeled option below needs it) -> ``p_t`` and teacher embeddings;
    3. terms (unweighted):

       * ``sup`` = ``CE + Dice`` of the labeled logits (:class:`~bundle.losses.supervised.SupervisedLoss`:
         squared-denominator foreground Dice, batch-global, as the released code);
       * ``uncl`` = UnCL (Eq. 1, :class:`~bundle.losses.dycon.UncertaintyAwareConsistencyLoss`) of the unlabeled
         student logits against ``p_t`` with ``beta = uncl_beta(t / max_iterations)``; ``uncl_on_labeled`` adds the
         labeled images (code);
       * ``fecl`` = FeCL (Eq. 3-6, :class:`~bundle.losses.dycon.FocalEntropyContrastiveLoss`) on the unlabeled
         volumes, token labels = block majority of the **teacher's arg-max** (never a ground truth: the unlabeled
         loader yields none); ``fecl_on_labeled`` adds the labeled volumes with their ground-truth tokens;

    4. after the optimizer step: EMA with ``alpha = min(1 - 1/(t+1), ema_decay)``.

    Paper Eq. 7: ``L = L_sup + eta (L_UnCL + L_FeCL)``, ``eta = 1`` (weights ``uncl = fecl = eta``; the code uses 0.5).

    Args:
        student: a :class:`~bundle.networks.peer.ProjectionVNet` (``forward_embedding`` -> ``(logits, embedding)``).
        loss_weights: weights of ``("sup", "uncl", "fecl")``.
        max_iterations: total iterations (``T`` of the beta schedule).
        noise_std, noise_clip: teacher input noise (0.1, 0.2).
        beta_schedule: ``"exp_decay"`` (paper), ``"geometric"`` (code) or ``"constant"``.
        beta_max, beta_min, beta_decay: paper 1.0, 0.1, 0.3 (0.1 ISLES); code (geometric) 5.0, 0.5.
        uncl_on_labeled: UnCL also on the labeled images (code) or on the unlabeled ones only (paper).
        fecl_temperature: ``tau`` (0.6).
        fecl_gamma: focal exponent (paper 0.8; ISLES 0.5; code 2.0).
        fecl_top_k: ``K`` teacher hard negatives (the paper gives no value; 0 disables them).
        fecl_focal: the focal weights ``F+``, ``F-``.
        fecl_entropy_weight: the gambling-softmax entropy adjustment of ``F+``.
        fecl_gs_temperature: ``T`` of the gambling softmax (not given in the paper; 1 = the plain softmax, as in the
            code's helper).
        fecl_on_labeled: FeCL also on the labeled volumes (with ground-truth token labels).
        student_teacher_args: ``ema_decay`` (0.99), ``ema_buffers``, ``teacher_train_mode`` (True, as the released
            code), ``infer_net`` (``"student"``): see :class:`~bundle.methods.ema.StudentTeacherMethod`.
    """

    term_names = ("sup", "uncl", "fecl")
    unlabeled_terms = UNLABELED_TERMS

    def __init__(
        self,
        student: nn.Module,
        loss_weights: Mapping[str, float],
        max_iterations: int,
        noise_std: float = 0.1,
        noise_clip: float = 0.2,
        beta_schedule: str = "exp_decay",
        beta_max: float = 1.0,
        beta_min: float = 0.1,
        beta_decay: float = 0.3,
        uncl_on_labeled: bool = False,
        fecl_temperature: float = 0.6,
        fecl_gamma: float = 0.8,
        fecl_top_k: int = 5,
        fecl_focal: bool = True,
        fecl_entropy_weight: bool = True,
        fecl_gs_temperature: float = 1.0,
        fecl_on_labeled: bool = False,
        **student_teacher_args: Any,
    ) -> None:
        super().__init__(
            student, loss_weights, max_iterations, noise_std=noise_std, noise_clip=noise_clip, **student_teacher_args
        )
        check_option("beta_schedule", beta_schedule, BETA_SCHEDULES)
        if fecl_gs_temperature <= 0:
            raise ValueError(f"fecl_gs_temperature must be > 0, got {fecl_gs_temperature}.")
        self.num_classes = int(student.head.out_channels)
        self.beta_schedule = beta_schedule
        self.beta_max, self.beta_min, self.beta_decay = float(beta_max), float(beta_min), float(beta_decay)
        self.uncl_on_labeled = bool(uncl_on_labeled)
        self.fecl_on_labeled = bool(fecl_on_labeled)
        self.fecl_gs_temperature = float(fecl_gs_temperature)
        self.supervised = SupervisedLoss()
        self.uncl = UncertaintyAwareConsistencyLoss()
        self.fecl = FocalEntropyContrastiveLoss(
            fecl_temperature, fecl_gamma, fecl_top_k, fecl_focal, fecl_entropy_weight
        )

    def beta(self, iteration: int) -> float:
        """UnCL's ``beta`` at 0-based ``iteration`` (:func:`~bundle.losses.dycon.uncl_beta` of ``t / T``)."""
        return uncl_beta(
            iteration / self.max_iterations, self.beta_schedule, self.beta_max, self.beta_min, self.beta_decay
        )

    def terms(
        self, labeled_image: Tensor, label: Tensor, unlabeled_image: Optional[Tensor], iteration: int, active: Weights
    ) -> Terms:
        """See :meth:`SSLMethod.terms`; returns the unweighted active terms."""
        images = self.joint_images(labeled_image, unlabeled_image)
        num_labeled = labeled_image.shape[0]
        if "fecl" in active:
            logits, embedding = self.student.forward_embedding(images)
            embedding = embedding.float()
        else:
            logits, embedding = self.student(images), None
        logits = logits.float()  # every term in float32, also under AMP
        losses: Dict[str, torch.Tensor] = {}
        if "sup" in active:
            losses["sup"] = self.supervised(logits[:num_labeled], label)
        if unlabeled_image is None:
            return losses

        # Teacher rows: all images when a labeled option needs them, else the unlabeled ones (row r <-> r + first).
        teacher_all = (self.uncl_on_labeled and "uncl" in active) or (self.fecl_on_labeled and "fecl" in active)
        first = 0 if teacher_all else num_labeled
        teacher_images = images[first:]
        teacher_embedding = None
        if "fecl" in active and self.fecl.top_k > 0:
            teacher_logits, teacher_embedding = self.teacher_forward(self.noisy(teacher_images), "forward_embedding")
            teacher_embedding = teacher_embedding.float()
        else:
            teacher_logits = self.teacher_forward(self.noisy(teacher_images))
        teacher_prob = torch.softmax(teacher_logits.float(), dim=1)

        if "uncl" in active:
            start = 0 if self.uncl_on_labeled else num_labeled
            losses["uncl"] = self.uncl(logits[start:], teacher_prob[start - first :], self.beta(iteration))
        if "fecl" in active:
            start = 0 if self.fecl_on_labeled else num_labeled
            grid = embedding.shape[2:]
            class_map = teacher_prob[num_labeled - first :].argmax(dim=1, keepdim=True)  # unlabeled: teacher arg-max
            if self.fecl_on_labeled:
                class_map = torch.cat([label, class_map])  # labeled: their ground truth
            tokens = token_labels(class_map, grid, self.num_classes)
            entropy = gambling_entropy(torch.softmax(logits[start:], dim=1), grid, self.fecl_gs_temperature)
            teacher_tokens = None if teacher_embedding is None else teacher_embedding[start - first :]
            losses["fecl"] = self.fecl(embedding[start:], tokens, teacher_tokens, entropy)
        return losses
