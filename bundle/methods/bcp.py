"""Bidirectional Copy-Paste, BCP (Bai et al., CVPR 2023), as in the released LA code
 (docs/methods/bcp.md): a copy-paste pre-training stage on labeled data, then
self-training of a student with an EMA teacher's pseudo-labels, both from one ``run training``."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn

from bundle.losses.baselines import CopyPasteLoss, HalfCEDiceLoss
from bundle.methods.base import Terms, Weights
from bundle.methods.ema import StudentTeacherMethod

#: the two training stages; the ``stage`` buffer holds the 1-based index.
PRETRAIN, SELFTRAIN = 1, 2


def copy_paste_mask(spatial_shape: Sequence[int], ratio: float, device: Optional[torch.device] = None) -> torch.Tensor:
    """BCP's mask ``M`` ``(1, 1, *spatial)`` float: 0 inside one random cube, 1 outside (docs/methods/bcp.md).

    The cube has size ``s_k = floor(ratio S_k)`` (``ratio = 2/3``: ``(74, 74, 53)`` for ``112 x 112 x 80``) and
    corner ``o_k ~ U{0, ..., S_k - s_k - 1}`` (0 when ``s_k = S_k``), drawn from torch's global generator, with
    ``S`` the actual patch (the released code hard-codes ``112 x 112 x 80``).
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"mask ratio must be in (0, 1], got {ratio}.")
    mask = torch.ones((1, 1, *spatial_shape), device=device)
    region = []
    for size in spatial_shape:
        cube = int(size * ratio)
        corner = int(torch.randint(0, max(size - cube, 1), (1,)))
        region.append(slice(corner, corner + cube))
    mask[(slice(None), slice(None), *region)] = 0.0
    return mask


def copy_paste(outside: torch.Tensor, inside: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``outside * M + inside * (1 - M)``: images or integer label maps ``(B, C, *spatial)``, with the same ``M``
    ``(1, 1, *spatial)`` (1 outside the cube). Label maps stay integer (``torch.where``, no arithmetic)."""
    if outside.shape != inside.shape:
        raise ValueError(f"copy-paste sources differ in shape: {list(outside.shape)} vs {list(inside.shape)}.")
    return torch.where(mask.bool(), outside, inside)


def largest_component(foreground: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a 3D boolean array (skimage's default full connectivity, as BCP's
    LCC); an empty or single-component array is returned unchanged.

    Hand-written on ``scipy.ndimage.label`` because MONAI's ``KeepLargestConnectedComponent`` needs scikit-image,
    which is not a dependency of this bundle."""
    labels, count = ndimage.label(foreground, structure=ndimage.generate_binary_structure(foreground.ndim, 3))
    if count <= 1:
        return foreground.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


@torch.no_grad()
def pseudo_label(prob: torch.Tensor, keep_largest: bool = True) -> torch.Tensor:
    """Hard pseudo-labels ``(B, 1, *spatial)`` long from teacher probabilities ``(B, C, *spatial)``
    (docs/methods/bcp.md, Eq. BCP-3).

    ``C = 2``: ``1[q_1 >= 0.5]`` (the released code); ``C > 2``: ``argmax_c q_c`` (BCP's ACDC code). With
    ``keep_largest``, each foreground class keeps only its largest connected component per sample
    (:func:`largest_component`); removed voxels become background.
    """
    if prob.shape[1] == 2:
        label = (prob[:, 1] >= 0.5).long()
    else:
        label = prob.argmax(dim=1)
    if keep_largest:
        array = label.cpu().numpy()
        for n in range(array.shape[0]):
            for c in np.unique(array[n]):
                if c == 0:
                    continue
                component = array[n] == c
                array[n][component & ~largest_component(component)] = 0
        label = torch.as_tensor(array, device=prob.device)
    return label.unsqueeze(1)


class BidirectionalCopyPasteMethod(StudentTeacherMethod):
    """Two stages in one run: ``t < pretrain_iterations`` pre-trains the student with labeled copy-paste, then the
    student self-trains with bidirectional copy-paste against an EMA teacher's pseudo-labels.

    **Stage 1, pre-training** (docs/methods/bcp.md; labeled only, the unlabeled batch is ignored): split the labeled
    batch ``(B_l, ...)`` into halves ``a, b``, draw one mask ``M`` (:func:`copy_paste_mask`) and train on
    ``X = x^a M + x^b (1 - M)``, ``Y = y^a M + y^b (1 - M)`` (the same ``M`` for image and label):
    ``pre = 1/2 [CE(z, Y) + Dice_bcp(p, Y)]`` (:class:`~bundle.losses.baselines.HalfCEDiceLoss` ``"bcp"``).

    **Stage start** (:meth:`on_stage_start`, called by the trainer at ``t = pretrain_iterations``, which also resets
    the optimizer state and the LR schedule): teacher <- student. The released code initialises both from the
    pre-training checkpoint with the best *test* Dice; here from the last one (``select: last``).

    **Stage 2, self-training** (docs/methods/bcp.md; ``B_l = B_u``, both even): halves ``a, b`` of both batches;

    1. teacher (no gradient, train mode, no noise) on ``x_u^a`` and ``x_u^b`` (two forwards, or one with
       ``joint_forward``): ``yhat = LCC(1[q_1 >= 0.5])`` (:func:`pseudo_label`); the labels of unlabeled images are
       never read (the trainer does not even pass them);
    2. a new ``M``; inward ``X_in = x_l^a M + x_u^a (1 - M)`` and outward ``X_out = x_u^b M + x_l^b (1 - M)``;
    3. student on ``X_in`` and ``X_out`` (two calls, or one with ``joint_forward``);
    4. with ``alpha = u_weight`` on the pseudo-labelled part (:class:`~bundle.losses.baselines.CopyPasteLoss`):

       * ``in = 1/2 [D(p_in, y_l^a; M) + alpha D(p_in, yhat^a; 1-M) + CE_M(z_in, y_l^a) + alpha CE_{1-M}(z_in,
         yhat^a)]``
       * ``out = 1/2 [alpha D(p_out, yhat^b; M) + D(p_out, y_l^b; 1-M) + alpha CE_M(z_out, yhat^b) + CE_{1-M}(z_out,
         y_l^b)]``

    5. after each optimizer step of stage 2: EMA with the constant ``ema_decay`` (no warm-up).

    No ramp (the released code computes one and never uses it). :meth:`term_weights` switches ``pre`` on in stage 1
    and ``in``, ``out`` in stage 2. The stage is a function of ``t``, so a resumed run knows it; the ``stage`` buffer
    (in the state dict and the resume checkpoint) records the stage of the latest iteration.

    Args:
        student: the V-Net (:class:`~bundle.networks.subnets.VNetSeg`); the teacher is its deep copy.
        loss_weights: weights of ``("pre", "in", "out")`` (all 1).
        max_iterations: total iterations of both stages; self-training runs ``max_iterations - pretrain_iterations``.
        pretrain_iterations: length of stage 1, ``0 <= pretrain_iterations < max_iterations``; ``None`` (default):
            ``max_iterations // 3``, the harmonised 2000 per 6000 (docs/methods/bcp.md).
        mask_ratio: ``beta``, the cube's size relative to the patch (2/3).
        u_weight: ``alpha``, the weight of the pseudo-labelled region (0.5).
        pseudo_lcc: keep the largest connected component of the pseudo-labels (True).
        joint_forward: one teacher and one student call on both halves instead of two each (False; with 2 + 2
            batches the separate calls give BatchNorm statistics over one volume, as in the released code's halves).
        student_teacher_args: ``ema_decay`` (0.99), ``ema_buffers``, ``teacher_train_mode`` (True, as the released
            code), ``infer_net`` (``"student"``): see :class:`~bundle.methods.ema.StudentTeacherMethod`.
            ``ema_decay`` is the constant ``alpha`` of stage 2.
    """

    term_names = ("pre", "in", "out")
    stateful_terms = True  # the ``stage`` buffer
    unlabeled_terms = ("in", "out")

    def __init__(
        self,
        student: nn.Module,
        loss_weights: Mapping[str, float],
        max_iterations: int,
        pretrain_iterations: Optional[int] = None,
        mask_ratio: float = 2.0 / 3.0,
        u_weight: float = 0.5,
        pseudo_lcc: bool = True,
        joint_forward: bool = False,
        **student_teacher_args: Any,
    ) -> None:
        super().__init__(student, loss_weights, max_iterations, ema_warmup=False, **student_teacher_args)
        if pretrain_iterations is None:
            pretrain_iterations = max_iterations // 3
        if not 0 <= pretrain_iterations < max_iterations:
            raise ValueError(
                f"pretrain_iterations must be in [0, max_iterations) so that self-training happens, got "
                f"pretrain_iterations={pretrain_iterations}, max_iterations={max_iterations}."
            )
        if not 0.0 < mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}.")
        self.pretrain_iterations = int(pretrain_iterations)
        self.stage_starts = (self.pretrain_iterations,)
        self.mask_ratio = float(mask_ratio)
        self.u_weight = float(u_weight)
        self.pseudo_lcc = bool(pseudo_lcc)
        self.joint_forward = bool(joint_forward)
        self.register_buffer("stage", torch.tensor(PRETRAIN if pretrain_iterations > 0 else SELFTRAIN))
        self.pretrain_loss = HalfCEDiceLoss("bcp")
        self.copy_paste_loss = CopyPasteLoss()

    # -------------------------------------------------------------------------------------------------- stages
    def stage_at(self, iteration: int) -> int:
        """1 (pre-training) for ``t < pretrain_iterations``, else 2 (self-training)."""
        return PRETRAIN if iteration < self.pretrain_iterations else SELFTRAIN

    def term_weights(self, iteration: int) -> Dict[str, float]:
        """``pre`` in stage 1; ``in`` and ``out`` in stage 2 (each its ``loss_weights`` value, no ramp)."""
        stage_terms = ("pre",) if self.stage_at(iteration) == PRETRAIN else ("in", "out")
        return {name: (w if name in stage_terms else 0.0) for name, w in self.loss_weights.items()}

    def on_stage_start(self, stage: int) -> None:
        """Self-training starts (the trainer's first stage boundary): teacher <- pre-trained student."""
        self.reset_teacher()
        self.stage.fill_(SELFTRAIN)

    def after_step(self, iteration: int) -> None:
        """EMA of the teacher (constant ``ema_decay``) after each self-training step; nothing in pre-training."""
        if self.stage_at(iteration) == SELFTRAIN:
            super().after_step(iteration)

    # ------------------------------------------------------------------------------------------------- batches
    def draw_mask(self, spatial_shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """One ``M`` per iteration (:func:`copy_paste_mask` with ``mask_ratio``), shared by all samples."""
        return copy_paste_mask(spatial_shape, self.mask_ratio, device)

    @staticmethod
    def _halves(batch: torch.Tensor, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        if batch.shape[0] < 2 or batch.shape[0] % 2:
            raise ValueError(
                f"BCP splits the {name} batch into two halves: its size must be even, got {batch.shape[0]}."
            )
        half = batch.shape[0] // 2
        return batch[:half], batch[half:]

    def pretrain_batch(self, labeled_image: torch.Tensor, label: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Stage-1 inputs: ``{"image": X, "label": Y, "mask": M}``, ``X`` and ``Y`` of ``B_l / 2`` samples."""
        image_a, image_b = self._halves(labeled_image, "labeled")
        label_a, label_b = self._halves(label, "labeled")
        mask = self.draw_mask(labeled_image.shape[2:], labeled_image.device)
        return {"image": copy_paste(image_a, image_b, mask), "label": copy_paste(label_a, label_b, mask), "mask": mask}

    def _forward_pair(self, network, first: torch.Tensor, second: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.joint_forward:
            return network(torch.cat([first, second])).split(first.shape[0])
        return network(first), network(second)

    def selftrain_batch(
        self, labeled_image: torch.Tensor, label: torch.Tensor, unlabeled_image: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        """Stage-2 inputs: ``image_in``, ``image_out`` (``B / 2`` samples each), ``mask`` ``M``, the labeled targets
        ``label_a``, ``label_b`` and the teacher's pseudo-labels ``pseudo_a``, ``pseudo_b`` (``(B/2, 1, *spatial)``)."""
        if labeled_image.shape[0] != unlabeled_image.shape[0]:
            raise ValueError(
                f"BCP pairs labeled and unlabeled halves: labeled_batch_size ({labeled_image.shape[0]}) must equal "
                f"unlabeled_batch_size ({unlabeled_image.shape[0]})."
            )
        image_a, image_b = self._halves(labeled_image, "labeled")
        label_a, label_b = self._halves(label, "labeled")
        unlabeled_a, unlabeled_b = self._halves(unlabeled_image, "unlabeled")
        logits_a, logits_b = self._forward_pair(self.teacher_logits, unlabeled_a, unlabeled_b)
        pseudo_a = pseudo_label(torch.softmax(logits_a, dim=1), self.pseudo_lcc)
        pseudo_b = pseudo_label(torch.softmax(logits_b, dim=1), self.pseudo_lcc)
        mask = self.draw_mask(labeled_image.shape[2:], labeled_image.device)
        return {
            "image_in": copy_paste(image_a, unlabeled_a, mask),
            "image_out": copy_paste(unlabeled_b, image_b, mask),
            "mask": mask,
            "label_a": label_a,
            "label_b": label_b,
            "pseudo_a": pseudo_a,
            "pseudo_b": pseudo_b,
        }

    # -------------------------------------------------------------------------------------------------- losses
    def terms(
        self, labeled_image: Tensor, label: Tensor, unlabeled_image: Optional[Tensor], iteration: int, active: Weights
    ) -> Terms:
        """See :meth:`SSLMethod.terms`: ``{"pre"}`` in stage 1, ``{"in", "out"}`` in stage 2 (unweighted)."""
        stage = self.stage_at(iteration)
        self.stage.fill_(stage)
        if stage == PRETRAIN:
            if "pre" not in active:
                return {}
            batch = self.pretrain_batch(labeled_image, label)
            return {"pre": self.pretrain_loss(self.student(batch["image"]).float(), batch["label"])}
        if unlabeled_image is None:  # in and out both weighted 0
            return {}
        batch = self.selftrain_batch(labeled_image, label, unlabeled_image)
        logits_in, logits_out = self._forward_pair(self.student, batch["image_in"], batch["image_out"])
        mask, alpha = batch["mask"], self.u_weight
        return {
            "in": self.copy_paste_loss(logits_in.float(), batch["label_a"], batch["pseudo_a"], mask, 1.0, alpha),
            "out": self.copy_paste_loss(logits_out.float(), batch["pseudo_b"], batch["label_b"], mask, alpha, 1.0),
        }
