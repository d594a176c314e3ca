"""The method plug-in interface that :class:`bundle.engine.trainer.SSLTrainer` drives.

A *method* owns what differs between semi-supervised algorithms: which networks exist (two subnets; a student and
an EMA teacher; one network), how the named loss terms are computed from one labeled and one unlabeled batch at
iteration ``t``, and what happens after an optimizer step. The trainer owns what every method shares: loaders,
AMP, the single backward of the weighted sum, the optimizer, LR schedule, events, logging and checkpoints.

Because a method is an ``nn.Module`` holding every network (teachers and buffers such as thresholds included),
``method.state_dict()`` is the complete model state of a resume checkpoint.
"""

from __future__ import annotations

from typing import Dict, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

#: the unweighted loss terms a method returns, by name.
Terms = Dict[str, Tensor]
#: term weights by name (``loss_weights``; the trainer's active terms).
Weights = Mapping[str, float]


class SSLMethod(nn.Module):
    """Base class of every method plug-in (the trainer <-> method contract: docs/architecture.md).

    Args:
        loss_weights: weight of each named term, e.g. ``{"sup": 1.0, "pgl": 1.0}``. A term whose weight is 0 is
            not computed. Names must be among :attr:`term_names`.
        max_iterations: total number of training iterations (for ramps that span the whole run).

    Subclasses set :attr:`term_names` and :attr:`unlabeled_terms`, implement :meth:`terms` and register their
    exported network with :meth:`set_inference_network`; they may override :meth:`term_weights` (ramps),
    :meth:`after_step` (EMA updates), :attr:`stage_starts` and :meth:`on_stage_start` (multi-stage methods such as
    BCP). What every method needs is done here once: the active terms (from the trainer, or from
    :meth:`active_terms`), the check that an unlabeled batch is there when an active term needs one, the joint
    labeled + unlabeled batch (:meth:`joint_images`), and the filtering of the returned terms to the active ones.
    """

    #: names of the loss terms this method can produce; ``loss_weights`` keys must be a subset.
    term_names: Sequence[str] = ()
    #: the terms that read the unlabeled batch; the trainer draws one only when one of them has a non-zero weight.
    unlabeled_terms: Sequence[str] = ()
    #: iterations (0-based) at which a new training stage starts; the trainer resets the optimizer state and the
    #: LR schedule there and calls :meth:`on_stage_start`. Empty for single-stage methods.
    stage_starts: Sequence[int] = ()
    #: the preset (``configs/methods/<name>.json``) of the supervised-only run this method is measured against: the
    #: same networks and supervised loss on the labeled data only. The preset of that name is itself a reference.
    #: Read by the benchmark report (:mod:`bundle.methods.presets`).
    reference_preset: str = "supervised_vnet"
    #: whether :meth:`terms` changes state that later iterations read (thresholds, the training stage); such state
    #: lives in buffers, so that ``state_dict()`` and a resume checkpoint hold it.
    stateful_terms: bool = False

    def __init__(self, loss_weights: Mapping[str, float], max_iterations: int) -> None:
        super().__init__()
        unknown = sorted(set(loss_weights) - set(self.term_names))
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: unknown loss_weights key(s) {unknown}; known terms: {list(self.term_names)}."
            )
        if max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {max_iterations}.")
        self.loss_weights = {name: float(loss_weights.get(name, 0.0)) for name in self.term_names}
        self.max_iterations = int(max_iterations)

    @property
    def uses_unlabeled(self) -> bool:
        """Whether the trainer must draw an unlabeled batch: some term of :attr:`unlabeled_terms` has a weight."""
        return any(self.loss_weights[name] != 0.0 for name in self.unlabeled_terms)

    def set_inference_network(self, network: nn.Module) -> None:
        """Keep ``network`` as :meth:`inference_network`, outside the registered submodules: it wraps networks the
        method already holds, so registering it would duplicate their weights in ``state_dict()`` under a new
        prefix."""
        object.__setattr__(self, "_inference_network", network)

    # ----------------------------------------------------------------------------------------------- training
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimizer updates (EMA teachers set ``requires_grad=False`` and are skipped)."""
        return (p for p in self.parameters() if p.requires_grad)

    def term_weights(self, iteration: int) -> Dict[str, float]:
        """Weight of each term at 0-based iteration ``iteration``; default: the constant ``loss_weights``."""
        return dict(self.loss_weights)

    def active_terms(self, iteration: int) -> Dict[str, float]:
        """The terms with a non-zero weight at ``iteration`` (only these are computed)."""
        return {name: w for name, w in self.term_weights(iteration).items() if w != 0.0}

    @staticmethod
    def joint_images(labeled_image: torch.Tensor, unlabeled_image: Optional[torch.Tensor]) -> torch.Tensor:
        """``cat([x_l, x_u])`` ``(B_l + B_u, C_in, H, W, D)`` when :meth:`terms` got an unlabeled batch (an active
        term reads it; one forward, BatchNorm statistics over both), else ``x_l``; rows ``[:B_l]`` are labeled."""
        return labeled_image if unlabeled_image is None else torch.cat([labeled_image, unlabeled_image])

    def compute_losses(
        self, labeled_image: Tensor, label: Tensor, unlabeled_image: Optional[Tensor], iteration: int, active=None
    ) -> Terms:
        """The *unweighted* scalar terms named in ``active`` (default :meth:`active_terms` of ``iteration``).

        Args:
            labeled_image: (B_l, C_in, H, W, D) float.
            label: (B_l, 1, H, W, D) integer class indices.
            unlabeled_image: (B_u, C_in, H, W, D) float, or ``None`` when :attr:`uses_unlabeled` is False. The
                trainer never passes a label for unlabeled items. It reaches :meth:`terms` only when an active term
                reads it (``None`` otherwise).
            iteration: 0-based index of the iteration whose loss is being built.
            active: the trainer's ``{name: weight}`` of the terms to compute at ``iteration``.

        Raises:
            ValueError: an active term of :attr:`unlabeled_terms` and no unlabeled batch.
        """
        active = self.active_terms(iteration) if active is None else active
        needed = [name for name in self.unlabeled_terms if name in active]
        if needed and unlabeled_image is None:
            raise ValueError(f"terms {needed} need an unlabeled batch, got None.")
        losses = self.terms(labeled_image, label, unlabeled_image if needed else None, iteration, active)
        return {name: value for name, value in losses.items() if name in active}

    def terms(
        self, labeled_image: Tensor, label: Tensor, unlabeled_image: Optional[Tensor], iteration: int, active: Weights
    ) -> Terms:
        """The method's own part of :meth:`compute_losses`: forward the networks, return (at least) the terms in
        ``active``; ``unlabeled_image`` is ``None`` unless an active term reads it."""
        raise NotImplementedError

    def forward(
        self, labeled_image: Tensor, label: Tensor, unlabeled_image: Optional[Tensor], iteration: int, active=None
    ) -> Terms:
        """Same as :meth:`compute_losses`; the trainer calls the method through ``forward`` so that wrapping the
        whole method in ``DistributedDataParallel`` synchronises the gradients of every trainable network."""
        return self.compute_losses(labeled_image, label, unlabeled_image, iteration, active)

    def after_step(self, iteration: int) -> None:
        """Called after every optimizer step with the same ``iteration`` (EMA updates live here)."""

    def on_stage_start(self, stage: int) -> None:
        """Called when training stage ``stage`` (1-based index into :attr:`stage_starts`) begins."""

    # ---------------------------------------------------------------------------------------------- inference
    def inference_network(self) -> nn.Module:
        """The single module whose ``forward(x)`` returns one tensor of class scores, used for validation,
        inference and ``models/model.pt`` (its flat state dict is what ``network_def`` loads); registered with
        :meth:`set_inference_network`."""
        return self._inference_network
