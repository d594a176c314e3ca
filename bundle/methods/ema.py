"""Exponential-moving-average (EMA) teachers, shared by Mean Teacher, UA-MT and BCP (docs/methods/README.md §4).

``theta_bar <- alpha_t theta_bar + (1 - alpha_t) theta`` after every optimizer step, on **parameters only**: the
teacher's BatchNorm running statistics are its own (it runs in train mode and accumulates them from its own
forwards), unless ``ema_buffers="copy"`` copies the student's buffers after each update.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from bundle.losses.functional import check_option
from bundle.methods.base import SSLMethod
from bundle.networks.subnets import SoftmaxOutput

#: which network a student-teacher method exports for validation and inference (docs/methods/README.md §4).
STUDENT_TEACHER_INFER_NETS = ("student", "teacher")
#: what happens to the teacher's buffers (BatchNorm running statistics) at an EMA update (docs/methods/README.md §4).
EMA_BUFFER_RULES = ("own", "copy")


def clipped_noise(images: torch.Tensor, std: float, clip: float) -> torch.Tensor:
    """``xi = clip(N(0, std^2), -clip, clip)``, one fresh draw per voxel, shaped like ``images`` (the teacher input
    noise of Mean Teacher, UA-MT and DyCON; docs/methods/mean_teacher.md, Eq. MT-2)."""
    return torch.clamp(torch.randn_like(images) * std, -clip, clip)


def ema_alpha(iteration: int, decay: float, warmup: bool = True) -> float:
    """The EMA coefficient of the step taken at 0-based iteration ``t``.

    With ``warmup`` (Mean Teacher, UA-MT): ``alpha_t = min(1 - 1 / (t + 1), alpha)``, i.e. 0 at ``t = 0`` (the
    teacher becomes a copy of the student), 0.5 at ``t = 1`` and ``alpha`` from ``t = 1 / (1 - alpha) - 1`` on (99
    for 0.99). Without (BCP): the constant ``alpha``.
    """
    return min(1.0 - 1.0 / (iteration + 1), decay) if warmup else decay


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, alpha: float, copy_buffers: bool = False) -> None:
    """In place, for every parameter pair: ``theta_bar <- alpha theta_bar + (1 - alpha) theta``.

    With ``copy_buffers`` the student's buffers (BatchNorm running mean/var, counters) are copied into the teacher;
    otherwise the teacher keeps its own. Both modules must have the same architecture.
    """
    teacher_params, student_params = list(teacher.parameters()), list(student.parameters())
    if len(teacher_params) != len(student_params):
        raise ValueError(f"teacher has {len(teacher_params)} parameters, student {len(student_params)}.")
    for teacher_param, student_param in zip(teacher_params, student_params):
        teacher_param.mul_(alpha).add_(student_param.detach(), alpha=1.0 - alpha)
    if copy_buffers:
        for teacher_buffer, student_buffer in zip(teacher.buffers(), student.buffers()):
            teacher_buffer.copy_(student_buffer)


class StudentTeacherMethod(SSLMethod):
    """Base of the methods with a trainable ``student`` and an EMA ``teacher`` of the same architecture.

    The teacher is a deep copy of the student, never receives gradient (``requires_grad=False``, so
    :meth:`~bundle.methods.base.SSLMethod.trainable_parameters` and the optimizer skip it), and is a registered
    submodule, so it is part of ``method.state_dict()`` and hence of every resume checkpoint. :meth:`after_step`
    applies :func:`ema_update_` with :func:`ema_alpha`.

    Args:
        student: the trained network (the V-Net, :class:`~bundle.networks.subnets.VNetSeg`), returning logits.
        loss_weights, max_iterations: see :class:`~bundle.methods.base.SSLMethod`.
        ema_decay: ``alpha`` (0.99).
        ema_warmup: ``min(1 - 1/(t+1), alpha)`` (Mean Teacher, UA-MT) or the constant ``alpha`` (BCP).
        ema_buffers: ``"own"`` (the teacher's BatchNorm statistics come from its own forwards) or ``"copy"``.
        teacher_train_mode: run the teacher in train mode (dropout on, batch statistics), as all released codes do;
            ``False`` runs it in eval mode.
        infer_net: ``"student"`` or ``"teacher"``: the network :meth:`inference_network` exports.
        noise_std, noise_clip: ``sigma`` and clip of the teacher input noise of :meth:`noisy` (0: none).
    """

    def __init__(
        self,
        student: nn.Module,
        loss_weights: Mapping[str, float],
        max_iterations: int,
        ema_decay: float = 0.99,
        ema_warmup: bool = True,
        ema_buffers: str = "own",
        teacher_train_mode: bool = True,
        infer_net: str = "student",
        noise_std: float = 0.0,
        noise_clip: float = 0.0,
    ) -> None:
        super().__init__(loss_weights, max_iterations)
        if noise_std < 0 or noise_clip < 0:
            raise ValueError(f"noise_std and noise_clip must be >= 0, got {noise_std}, {noise_clip}.")
        self.noise_std, self.noise_clip = float(noise_std), float(noise_clip)
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}.")
        check_option("ema_buffers", ema_buffers, EMA_BUFFER_RULES)
        check_option("infer_net", infer_net, STUDENT_TEACHER_INFER_NETS)
        self.student = student
        self.teacher = copy.deepcopy(student)
        self.teacher.requires_grad_(False)
        self.ema_decay = float(ema_decay)
        self.ema_warmup = bool(ema_warmup)
        self.ema_buffers = ema_buffers
        self.teacher_train_mode = bool(teacher_train_mode)
        self.infer_net = infer_net
        self.set_inference_network(SoftmaxOutput(self.teacher if infer_net == "teacher" else student))

    def reset_teacher(self) -> None:
        """Teacher <- student (parameters and buffers); the teacher stays frozen (``requires_grad=False``)."""
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

    def after_step(self, iteration: int) -> None:
        """EMA update of the teacher with ``alpha_t`` (:func:`ema_alpha`) of the step ``iteration`` just taken."""
        alpha = ema_alpha(iteration, self.ema_decay, self.ema_warmup)
        ema_update_(self.teacher, self.student, alpha, copy_buffers=self.ema_buffers == "copy")

    @torch.no_grad()
    def teacher_forward(self, images: torch.Tensor, method: str = "forward"):
        """The teacher's ``method`` (``forward``, or e.g. ``forward_deep`` of a deep-supervised net) on ``images``,
        without gradient, in train mode by default (``teacher_train_mode``: dropout on, BatchNorm batch statistics,
        docs/methods/mean_teacher.md)."""
        was_training = self.teacher.training
        self.teacher.train(self.teacher_train_mode)
        try:
            return getattr(self.teacher, method)(images)
        finally:
            self.teacher.train(was_training)

    def noisy(self, images: torch.Tensor) -> torch.Tensor:
        """``images + xi``, ``xi = clip(N(0, noise_std^2), -noise_clip, noise_clip)`` drawn per voxel
        (:func:`clipped_noise`; docs/methods/mean_teacher.md, Eq. MT-2)."""
        return images + clipped_noise(images, self.noise_std, self.noise_clip)

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """``f_teacher(images)`` ``(B, C, *spatial)`` in float32, without gradient (:meth:`teacher_forward`)."""
        return self.teacher_forward(images).float()

    def teacher_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """``softmax_C(f_teacher(images))``, ``(B, C, *spatial)``, float32, no gradient."""
        return torch.softmax(self.teacher_logits(images), dim=1)
