"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017) as used in 3D by SSL4MIS and UA-MT's LA recipe
(docs/methods/mean_teacher.md)."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from bundle.losses.baselines import HalfCEDiceLoss, SoftmaxMSELoss
from bundle.losses.functional import check_option
from bundle.losses.ramps import ramp_schedule, stepped_rampup
from bundle.methods.base import Terms, Weights
from bundle.methods.ema import StudentTeacherMethod

#: the images the consistency term covers: the unlabeled part (README commands) or labeled + unlabeled.
CONSISTENCY_TARGETS = ("unlabeled", "all")


class MeanTeacherMethod(StudentTeacherMethod):
    """A student and its EMA teacher; the student matches the teacher's softmax on noisy inputs.

    One iteration at ``t`` (docs/methods/mean_teacher.md), with ``x = cat(x_l, x_u)`` of shape ``(B_l + B_u, C_in, H, W,
    D)``:

    1. student on ``x`` in **one** call (BatchNorm statistics mix labeled and unlabeled): ``z = f_theta(x)``,
       ``p = softmax_C(z)``;
    2. teacher, no gradient, train mode, on ``x_u + xi`` with ``xi = clip(N(0, noise_std^2), -noise_clip,
       noise_clip)`` drawn per voxel at every iteration: ``pbar = softmax_C(f_theta_bar(x_u + xi))``; the student's
       input stays clean;
    3. unweighted terms:

       * ``sup = 1/2 [CE(z_l, y_l) + Dice(p_l, y_l)]`` on ``(B_l, C, H, W, D)``
         (:class:`~bundle.losses.baselines.HalfCEDiceLoss`, ``dice_variant``);
       * ``cons = mean_{n,c,v} (p_u - sg(pbar))^2`` over ``(B_u, C, H, W, D)``
         (:class:`~bundle.losses.baselines.SoftmaxMSELoss`; restricted to :meth:`consistency_mask` where a
         subclass defines one); ``consistency_on="all"`` covers all ``B_l + B_u`` images (teacher on ``x + xi``);

    4. after the optimizer step: EMA with ``alpha_t = min(1 - 1/(t+1), ema_decay)`` (:func:`~bundle.methods.ema.
       ema_alpha`).

    :meth:`term_weights`: ``sup`` keeps its weight; ``cons`` is ``lambda(t) = w_cons r(step floor(t / step), L)``
    (:func:`~bundle.losses.ramps.stepped_rampup`) with ``w_cons = 0.1``, ``L = rampup_iters`` (LA: 6000) and
    ``step = rampup_step`` (LA: 150), i.e. the released code's ``0.1 r(floor(t / 150), 40)``.

    Args:
        student: the V-Net (:class:`~bundle.networks.subnets.VNetSeg`); the teacher is its deep copy.
        loss_weights: weights of ``("sup", "cons")``; ``cons`` is the maximum ``lambda`` of the ramp.
        max_iterations: total iterations.
        rampup_iters: ``L`` of the consistency ramp, in iterations; ``None`` (default): ``max_iterations``, the whole
            run (6000 on LA, as the released code).
        rampup_step: ramp quantisation in iterations; ``None`` (default): ``max(1, L // 40)`` (150 for 6000, as the
            released code); 1 = smooth (:func:`~bundle.losses.ramps.ramp_schedule`).
        noise_std, noise_clip: teacher input noise ``sigma`` (0.1) and its clip (0.2).
        consistency_on: ``"unlabeled"`` (default) or ``"all"``.
        dice_variant: ``"fg_sq"`` (UA-MT LA recipe, default), ``"mean_sq"`` (SSL4MIS) or ``"bcp"``.
        student_teacher_args: ``ema_decay`` (0.99), ``ema_buffers``, ``teacher_train_mode`` (True, as the released
            code), ``infer_net`` (``"student"``): see :class:`~bundle.methods.ema.StudentTeacherMethod`.
    """

    term_names = ("sup", "cons")
    unlabeled_terms = ("cons",)

    def __init__(
        self,
        student: nn.Module,
        loss_weights: Mapping[str, float],
        max_iterations: int,
        rampup_iters: Optional[int] = None,
        rampup_step: Optional[int] = None,
        noise_std: float = 0.1,
        noise_clip: float = 0.2,
        consistency_on: str = "unlabeled",
        dice_variant: str = "fg_sq",
        **student_teacher_args: Any,
    ) -> None:
        super().__init__(
            student, loss_weights, max_iterations, noise_std=noise_std, noise_clip=noise_clip, **student_teacher_args
        )
        check_option("consistency_on", consistency_on, CONSISTENCY_TARGETS)
        self.rampup_iters, self.rampup_step = ramp_schedule(max_iterations, rampup_iters, rampup_step)
        self.consistency_on = consistency_on
        self.supervised = HalfCEDiceLoss(dice_variant)
        self.consistency = SoftmaxMSELoss()

    def consistency_ramp(self, iteration: int) -> float:
        """``r(step floor(t / step), rampup_iters)`` at 0-based ``iteration``."""
        return stepped_rampup(iteration, self.rampup_iters, self.rampup_step)

    def term_weights(self, iteration: int) -> Dict[str, float]:
        """``sup`` constant; ``cons`` times :meth:`consistency_ramp` at ``iteration``."""
        weights = dict(self.loss_weights)
        weights["cons"] *= self.consistency_ramp(iteration)
        return weights

    def consistency_mask(self, images: torch.Tensor, iteration: int) -> Optional[torch.Tensor]:
        """Voxels the consistency covers, ``(B, 1, *spatial)``; ``None`` = all (Mean Teacher). UA-MT overrides it."""
        return None

    def terms(
        self, labeled_image: Tensor, label: Tensor, unlabeled_image: Optional[Tensor], iteration: int, active: Weights
    ) -> Terms:
        """See :meth:`SSLMethod.terms`: ``sup`` and ``cons`` from one student forward of
        :meth:`SSLMethod.joint_images`."""
        images = self.joint_images(labeled_image, unlabeled_image)
        num_labeled = labeled_image.shape[0]
        logits = self.student(images).float()  # every term in float32, also under AMP
        losses: Dict[str, torch.Tensor] = {}
        if "sup" in active:
            losses["sup"] = self.supervised(logits[:num_labeled], label)
        if "cons" in active:
            on_all = self.consistency_on == "all"
            consistency_images = images if on_all else unlabeled_image
            student_logits = logits if on_all else logits[num_labeled:]
            teacher_prob = self.teacher_probabilities(self.noisy(consistency_images))
            mask = self.consistency_mask(consistency_images, iteration)
            losses["cons"] = self.consistency(student_logits, teacher_prob, mask)
        return losses
