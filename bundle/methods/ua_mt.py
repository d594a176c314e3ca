"""Uncertainty-aware Mean Teacher, UA-MT (Yu et al., MICCAI 2019), as in the released LA code
(docs/methods/ua_mt.md)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from bundle.losses.functional import softmax_entropy
from bundle.losses.ramps import sigmoid_rampup
from bundle.methods.mean_teacher import MeanTeacherMethod

#: eps of the predictive entropy ``u = -sum_c mu_c ln(mu_c + eps)``, the released code's (so a one-hot ``mu`` gives
#: ``u`` of about ``-1e-6``, not NaN).
ENTROPY_EPS = 1e-6


def uncertainty_threshold(iteration: int, rampup_iters: int, num_classes: int = 2) -> float:
    """``tau(t) = (3/4 + 1/4 r(t, t_max)) ln C`` (docs/methods/ua_mt.md, Eq. UA-3), ``r`` the smooth ramp in
    **iterations** (not quantised). For ``C = 2``, ``t_max = 6000``: 0.521028 at ``t = 0``, 0.569508 at 3000 and ``ln 2
    = 0.693147`` from 6000 on (docs/methods/ua_mt.md, Eq. UA-3)."""
    return (0.75 + 0.25 * sigmoid_rampup(iteration, rampup_iters)) * math.log(num_classes)


class UncertaintyAwareMeanTeacherMethod(MeanTeacherMethod):
    """Mean Teacher whose consistency only covers voxels where the teacher is certain.

    Everything of :class:`~bundle.methods.mean_teacher.MeanTeacherMethod` (student on ``cat(x_l, x_u)``, one noisy
    teacher pass as the target ``pbar``, EMA with warm-up, ``lambda(t)`` ramp of ``cons``), plus
    (docs/methods/ua_mt.md):

    1. **Monte-Carlo uncertainty** with ``T = mc_samples`` (8): ``T / 2`` teacher passes under no_grad, each on the
       duplicated batch ``[x_u; x_u]`` (``2 B_u`` volumes) with a fresh clipped-Gaussian noise per voxel, dropout on:
       ``mu = 1/T sum_k softmax(f_theta_bar(x_u + xi_k))`` ``(B_u, C, *spatial)`` and
       ``u = -sum_c mu_c ln(mu_c + 1e-6)`` ``(B_u, 1, *spatial)`` (:func:`~bundle.losses.functional.softmax_entropy`);
    2. **threshold** ``tau(t) = (3/4 + 1/4 r(t, uncertainty_rampup_iters)) ln C`` (:func:`uncertainty_threshold`);
    3. **mask** ``m = 1[u < tau(t)]``, and ``cons = sum m (p_u - sg(pbar))^2 / (C sum m + 1e-16)`` (mean over the
       certain voxels and all channels; 0 for an empty mask), see :class:`~bundle.losses.baselines.SoftmaxMSELoss`.

    The target ``pbar`` is the separate MT teacher pass, not ``mu``. With ``consistency_on="all"`` the uncertainty
    and the consistency cover ``cat(x_l, x_u)`` (the ``..._certainty.py`` variant of the released code).

    After each :meth:`consistency_mask` call, :attr:`last_threshold` (``tau``) and :attr:`last_mask_fraction` (mean
    of ``m``) hold the values of that iteration, for logging and tests.

    Args:
        mc_samples: ``T``, an even number >= 2 (8).
        uncertainty_rampup_iters: ``t_max`` of the threshold ramp, in iterations; ``None`` (default):
            ``max_iterations``, the whole run (6000 on LA).
        args, mean_teacher_args: every other argument, with its default, of
            :class:`~bundle.methods.mean_teacher.MeanTeacherMethod` (``student``, ``loss_weights``,
            ``max_iterations``, ``rampup_iters``, ``noise_std``, ...).
    """

    def __init__(
        self, *args: Any, uncertainty_rampup_iters: Optional[int] = None, mc_samples: int = 8, **mean_teacher_args: Any
    ) -> None:
        super().__init__(*args, **mean_teacher_args)
        if mc_samples < 2 or mc_samples % 2:
            raise ValueError(f"mc_samples must be an even number >= 2 (T/2 passes on [x; x]), got {mc_samples}.")
        if uncertainty_rampup_iters is None:
            uncertainty_rampup_iters = self.max_iterations
        if uncertainty_rampup_iters < 0:
            raise ValueError(f"uncertainty_rampup_iters must be >= 0, got {uncertainty_rampup_iters}.")
        self.mc_samples = int(mc_samples)
        self.uncertainty_rampup_iters = int(uncertainty_rampup_iters)
        self.last_threshold: Optional[float] = None
        self.last_mask_fraction: Optional[float] = None

    def threshold(self, iteration: int, num_classes: int) -> float:
        """:func:`uncertainty_threshold` at ``iteration`` for ``num_classes``."""
        return uncertainty_threshold(iteration, self.uncertainty_rampup_iters, num_classes)

    @torch.no_grad()
    def mc_mean_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """``mu`` ``(B, C, *spatial)``: the mean of ``mc_samples`` noisy teacher softmaxes, from ``mc_samples / 2``
        forwards of the duplicated batch ``[x; x]`` (shapes read from ``images`` ``(B, C_in, *spatial)``)."""
        batch = images.shape[0]
        repeated = images.repeat(2, *([1] * (images.dim() - 1)))
        total = None
        for _ in range(self.mc_samples // 2):
            prob = self.teacher_probabilities(self.noisy(repeated))
            pair_sum = prob[:batch] + prob[batch:]
            total = pair_sum if total is None else total + pair_sum
        return total / self.mc_samples

    def consistency_mask(self, images: torch.Tensor, iteration: int) -> torch.Tensor:
        """``m = 1[u < tau(t)]`` ``(B, 1, *spatial)`` float, ``u`` the predictive entropy of
        :meth:`mc_mean_probabilities` of ``images`` and ``C`` read from it."""
        mean_prob = self.mc_mean_probabilities(images)
        threshold = self.threshold(iteration, mean_prob.shape[1])
        mask = (softmax_entropy(mean_prob, ENTROPY_EPS, keepdim=True) < threshold).float()
        self.last_threshold = threshold
        self.last_mask_fraction = float(mask.mean())
        return mask
