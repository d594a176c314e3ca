"""A method-agnostic semi-supervised trainer on top of ``monai.engines.SupervisedTrainer``.

The trainer owns what every method shares: the labeled loader (one pass = one ignite epoch), an endlessly cycled,
reshuffled unlabeled loader, AMP, one backward of the weighted sum of the method's named terms, the optimizer
step, the LR schedule, stage boundaries, and the events MONAI handlers rely on. The *method*
(:class:`bundle.methods.base.SSLMethod`) owns the networks and the losses.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Tuple

import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from bundle.config.booleans import parse_bool
from bundle.data.checks import check_batch_labels
from bundle.data.transforms import LABEL_FILE_KEY
from bundle.engine.precision import autocast, emulated_bf16, guard_small_depth_convolutions, resolve_precision
from bundle.engine.resume import ResumableStream, capture_rng, restore_rng
from bundle.engine.runtime import tune_cpu_allocator
from bundle.methods.base import SSLMethod

logger = logging.getLogger(__name__)


class SSLTrainer(SupervisedTrainer):
    """Trains any :class:`SSLMethod` on a labeled and an unlabeled stream.

    Args:
        device: where batches and networks live.
        max_iterations: training stops after this many iterations (mid-epoch if need be).
        max_epochs: passes over the labeled loader; must cover ``max_iterations``. ``train.json`` passes
            ``max_iterations`` itself, an upper bound for any loader length, so that a checkpoint resumes under
            another number of processes or batch size (MONAI's ``CheckpointLoader`` refuses a checkpoint whose
            epoch count exceeds ``max_epochs``).
        train_data_loader: labeled batches ``{"image": (B_l, C, *patch), "label": (B_l, 1, *patch)}``.
        method: the method plug-in; it is also the ``network`` of the underlying ``SupervisedTrainer``. It may be
            wrapped in ``DistributedDataParallel`` (multi-GPU); the trainer calls it through ``forward``.
        optimizer: one optimizer over ``method.trainable_parameters()``.
        unlabeled_data_loader: unlabeled batches ``{"image": (B_u, C, *patch)}``; required when
            ``method.uses_unlabeled``. It is cycled endlessly and reshuffled at every pass.
        lr_scheduler: the per-iteration LR scheduler (stepped by a ``LrScheduleHandler``); the trainer only uses it
            to restart the schedule at a stage boundary (``method.stage_starts``).
        precision: ``auto`` (fp16 AMP with a gradient scaler on CUDA, bf16 autocast on a CPU with native bf16, fp32
            on other CPUs) | ``fp32`` | ``bf16`` | ``fp16`` (:mod:`bundle.engine.precision`). The resolved value is
            :attr:`precision`; under CPU bf16 the method's convolutions that oneDNN gets wrong in bf16 run in fp32
            (:func:`bundle.engine.precision.guard_small_depth_convolutions`).
        cpu_allocator_cache: on CPU, keep freed tensor memory in the process
            (``bundle.engine.runtime.tune_cpu_allocator``): fewer page faults, faster iterations, but a higher peak RSS
            from heap fragmentation (112x112x80, batch 2+2, activation checkpointing: 29 s and 9.4 GiB with it, 40 s and
            6.1 GiB without; docs/RESULTS.md). Off by default, so that training memory stays within half of the authors'
            code.
        channels_last: keep the networks' weights and the input batches channels-last (``torch.channels_last_3d``,
            NDHWC), on which oneDNN's fp32 3D convolutions run faster, their backward most (``auto``: on a CPU in
            fp32, i.e. a CPU without native bf16; measured on an AVX2-only AMD EPYC: 12 % less CPU time per 32³
            dual-network iteration, 1.8x faster backward of a 16-channel 32³ convolution). The numbers are the same
            up to float rounding. ``True`` / ``False`` force it.
        num_classes: when given, every labeled batch's label values must lie in ``[0, num_classes)``, else the run
            stops naming the label files (:func:`bundle.data.checks.check_batch_labels`; with ``check_data`` off a bad
            label would otherwise end in an ``IndexError`` of the cross-entropy, naming no file).
        kwargs: passed to ``SupervisedTrainer`` (``train_handlers``, ...); AMP is set by ``precision``.
            ``optim_set_to_none`` defaults to ``True`` (torch's own default, MONAI's is ``False``): gradients are
            freed before each forward instead of zeroed in place, which lowers the peak RSS of a 64x64x32
            dual-network iteration by about 0.09 GiB; the weights are bit-identical when every parameter gets a
            gradient.

    ``engine.state.output`` holds ``image``, ``label``, ``loss`` (the weighted sum) and ``loss_<name>`` (each
    unweighted term), all detached.

    Exact resume: both loaders are read through :class:`~bundle.engine.resume.ResumableStream`, and :meth:`state_dict`
    (the ``trainer`` entry of a resume checkpoint) adds to ignite's iteration count every global generator
    (``rng``) and each stream's pass and position, so that a resumed run draws the same batches and random numbers
    as the uninterrupted one. The checkpoint must be written after every other ``ITERATION_COMPLETED`` handler
    (validation draws from torch's generator), as ``train.json`` does by attaching the saver last.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_iterations: int,
        max_epochs: int,
        train_data_loader: Iterable,
        method: SSLMethod,
        optimizer: torch.optim.Optimizer,
        unlabeled_data_loader: Optional[Iterable] = None,
        lr_scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
        precision: str = "auto",
        cpu_allocator_cache: bool = False,
        channels_last: bool | str = "auto",
        num_classes: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        self.num_classes = num_classes
        self.precision = resolve_precision(precision, device)
        if emulated_bf16(self.precision, device):
            logger.warning(
                "precision 'bf16' on a CPU without native bf16 (no AVX-512 BF16 / AMX): PyTorch emulates it and "
                "training runs tens of times slower than in fp32; use precision 'auto' or 'fp32' on this CPU."
            )
        self.channels_last = use_channels_last(channels_last, device, self.precision)
        kwargs["amp"] = self.precision == "fp16"  # the gradient scaler is for fp16 only
        kwargs.setdefault("optim_set_to_none", True)
        if cpu_allocator_cache and torch.device(device).type == "cpu":
            tune_cpu_allocator()
        if self.precision == "bf16" and torch.device(device).type == "cpu":
            guard_small_depth_convolutions(method)
        plugin: SSLMethod = getattr(method, "module", method)  # unwrap DistributedDataParallel
        if self.channels_last:
            plugin.to(memory_format=torch.channels_last_3d)  # in place: the optimizer keeps the same parameters
        if plugin.uses_unlabeled and unlabeled_data_loader is None:
            raise ValueError(f"{type(plugin).__name__} trains on unlabeled data but no unlabeled loader was given.")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=method,
            optimizer=optimizer,
            loss_function=None,
            decollate=False,
            **kwargs,
        )
        self.method = plugin
        self.max_iterations = int(max_iterations)
        self.data_loader = ResumableStream(self.data_loader)
        self.unlabeled_data_loader = unlabeled_data_loader
        self.unlabeled_stream = None
        if unlabeled_data_loader is not None:
            self.unlabeled_stream = ResumableStream(unlabeled_data_loader, set_sampler_epoch=True)
        self.lr_scheduler = lr_scheduler
        self._unlabeled_iterator: Optional[Iterator] = None
        self.add_event_handler(Events.ITERATION_COMPLETED, self._stop_at_max_iterations)

    def _stop_at_max_iterations(self, engine: Engine) -> None:
        if engine.state.iteration >= self.max_iterations:
            engine.terminate()

    def next_unlabeled_batch(self) -> Dict[str, torch.Tensor]:
        """The next unlabeled batch; a new (reshuffled) pass starts when the loader is exhausted."""
        while True:
            if self._unlabeled_iterator is None:
                self._unlabeled_iterator = iter(self.unlabeled_stream)
            try:
                return next(self._unlabeled_iterator)
            except StopIteration:
                self._unlabeled_iterator = None

    def state_dict(self) -> OrderedDict:
        """Ignite's state (``iteration``, ``epoch_length``, ``max_epochs``) plus ``rng`` (every global generator,
        :func:`~bundle.engine.resume.capture_rng`), the ``labeled_stream`` / ``unlabeled_stream`` positions and, under
        fp16 AMP, the gradient ``scaler``."""
        state = super().state_dict()
        if self.scaler is not None:  # fp16 AMP's loss scale
            state["scaler"] = self.scaler.state_dict()
        state["rng"] = capture_rng()
        state["labeled_stream"] = self.data_loader.state_dict()
        if self.unlabeled_stream is not None:
            state["unlabeled_stream"] = self.unlabeled_stream.state_dict()
        return state

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore :meth:`state_dict`. A checkpoint without generator and stream states (written before they were
        saved), or any checkpoint in a multi-process run (it holds rank 0's generators only), resumes at its
        iteration with fresh generators and data passes, i.e. not bit-identically (a warning says so)."""
        super().load_state_dict(state_dict)
        self._unlabeled_iterator = None
        if self.scaler is not None and "scaler" in state_dict:
            self.scaler.load_state_dict(state_dict["scaler"])
        if "rng" not in state_dict:
            logger.warning("checkpoint has no generator or data-stream state: the run resumes, but not exactly")
            return
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1:
            # the checkpoint holds rank 0's generators only; other ranks must keep their own seeds
            logger.warning("multi-process resume: generators and data streams restart, the run resumes not exactly")
            return
        restore_rng(state_dict["rng"])
        self.data_loader.load_state_dict(state_dict["labeled_stream"])
        if self.unlabeled_stream is not None and "unlabeled_stream" in state_dict:
            self.unlabeled_stream.load_state_dict(state_dict["unlabeled_stream"])

    def _start_stage_if_due(self, iteration: int) -> None:
        """At a stage boundary: fresh optimizer state, LR schedule restarted, and the method told."""
        if iteration not in self.method.stage_starts:
            return
        self.optimizer.state.clear()
        if self.lr_scheduler is not None:
            for group, base_lr in zip(self.optimizer.param_groups, self.lr_scheduler.base_lrs):
                group["lr"] = base_lr
            self.lr_scheduler.last_epoch = 0
        self.method.on_stage_start(list(self.method.stage_starts).index(iteration) + 1)

    def _forward_backward(
        self,
        engine: SSLTrainer,
        image: torch.Tensor,
        label: torch.Tensor,
        unlabeled: Optional[torch.Tensor],
        iteration: int,
        weights: Dict[str, float],
        precision: str,
    ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """Zeroed gradients, the method's terms under ``precision``, one backward of their weighted sum (scaled
        under fp16 AMP); fires ``FORWARD_COMPLETED``, ``LOSS_COMPLETED`` and ``BACKWARD_COMPLETED``."""
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with autocast(precision, engine.state.device):
            terms = engine.network(image, label.long(), unlabeled, iteration, weights)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            loss = sum(weights[name] * value for name, value in terms.items())
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if engine.amp and engine.scaler is not None:
            engine.scaler.scale(loss).backward()
        else:
            loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        return terms, loss

    def _iteration(self, engine: SSLTrainer, batchdata: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One step: draw the unlabeled batch, let the method compute its terms, one backward of the weighted
        sum, one optimizer step, the method's post-step hook. Fires the standard ``IterationEvents``."""
        iteration = engine.state.iteration - 1  # ignite counts from 1; methods and ramps from 0
        self._start_stage_if_due(iteration)
        if self.num_classes is not None:
            check_batch_labels(batchdata[CommonKeys.LABEL], self.num_classes, batchdata.get(LABEL_FILE_KEY))
        image, label = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        unlabeled = None
        if self.method.uses_unlabeled:
            unlabeled_batch = self.next_unlabeled_batch()
            unlabeled = unlabeled_batch[CommonKeys.IMAGE].to(engine.state.device, non_blocking=engine.non_blocking)
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
            unlabeled = None if unlabeled is None else unlabeled.contiguous(memory_format=torch.channels_last_3d)
        engine.state.output = {CommonKeys.IMAGE: image, CommonKeys.LABEL: label}

        engine.network.train()
        weights = self.method.active_terms(iteration)
        terms, loss = self._forward_backward(engine, image, label, unlabeled, iteration, weights, self.precision)
        finite = engine.amp or gradients_finite(self.method)  # under fp16 AMP the gradient scaler skips such steps
        if not (finite and torch.isfinite(loss)):
            bad = [name for name, value in terms.items() if not torch.isfinite(value)] or ["the gradients"]
            raise FloatingPointError(
                f"iteration {iteration + 1}: non-finite {', '.join(bad)} (loss {float(loss.detach())}); training "
                "stopped before the optimizer step, so the weights are those of the last finite iteration."
            )
        if engine.amp and engine.scaler is not None:
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            engine.optimizer.step()
        self.method.after_step(iteration)
        engine.state.output[CommonKeys.LOSS] = loss.detach()
        engine.state.output.update({f"loss_{name}": value.detach() for name, value in terms.items()})
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def use_channels_last(setting: bool | str, device: torch.device | str, precision: str) -> bool:
    """Resolve the trainer's ``channels_last`` setting: ``auto`` is on for fp32 training on a CPU."""
    if setting == "auto":
        return torch.device(device).type == "cpu" and precision == "fp32"
    return parse_bool(setting, "train#trainer#channels_last (or auto)")


def gradients_finite(module: torch.nn.Module) -> bool:
    """Whether every gradient of ``module``'s parameters is finite (parameters without a gradient are skipped)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


def loss_terms(output: Dict[str, Any]) -> Dict[str, float]:
    """``output_transform`` for Stats/TensorBoard handlers: every ``loss`` / ``loss_<name>`` entry as a float."""
    return {key: float(value) for key, value in output.items() if key == "loss" or key.startswith("loss_")}
