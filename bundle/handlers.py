"""Small ignite handlers that MONAI lacks: a progress line with ETA, deploy weights written only on success, and the
inference rewrite of a loaded network."""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

import torch
from ignite.engine import Engine, Events
from torch import nn

from bundle.network_optimization import optimize_for_inference


class ProgressLogger:
    """Logs ``iteration t/T, loss, (each unweighted term), s/it, ETA`` every ``interval`` iterations (and at the
    last one).

    MONAI's ``StatsHandler`` prints every term but neither the iteration budget nor the time left, which is what a
    user waiting on a CPU run wants to see.
    """

    def __init__(self, max_iterations: int, interval: int = 10, name: str = "bundle.progress") -> None:
        self.max_iterations = int(max_iterations)
        self.interval = max(1, int(interval))
        self.logger = logging.getLogger(name)
        self._start = 0.0
        self._start_iteration: Optional[int] = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)

    def _iteration_started(self, engine: Engine) -> None:
        if self._start_iteration is None:  # first iteration of this run (after any resume)
            self._start = time.perf_counter()
            self._start_iteration = engine.state.iteration - 1

    def _iteration_completed(self, engine: Engine) -> None:
        iteration = engine.state.iteration
        if iteration % self.interval and iteration != self.max_iterations:
            return
        done = iteration - self._start_iteration
        per_iteration = (time.perf_counter() - self._start) / max(done, 1)
        eta = per_iteration * max(self.max_iterations - iteration, 0)
        output = engine.state.output if isinstance(engine.state.output, dict) else {}
        loss = float(output.get("loss", float("nan")))
        terms = "  ".join(f"{k[len('loss_'):]} {float(v):.4f}" for k, v in output.items() if k.startswith("loss_"))
        self.logger.info(
            f"iteration {iteration}/{self.max_iterations}  loss {loss:.4f}  ({terms})  {per_iteration:.2f} s/it  "
            f"ETA {eta / 60:.1f} min"
        )


class SaveStateDictOnCompletion:
    """Writes ``network.state_dict()`` (a flat dict, as ``ckpt_export`` and the Model Zoo expect) to ``path`` when
    training completes.

    MONAI's ``CheckpointSaver(save_final=True)`` also writes on an exception, which would replace good deploy weights
    with those of a crashed or interrupted run; resume checkpoints use ``CheckpointSaver``, deploy weights use this.
    The file is written under a temporary name and renamed, so it is never half-written.
    """

    def __init__(self, network: nn.Module, path: str) -> None:
        self.network = network
        self.path = path

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.tmp-{os.getpid()}"
        torch.save(self.network.state_dict(), tmp)
        os.replace(tmp, self.path)
        logging.getLogger("bundle.progress").info(f"saved {self.path}")


class OptimizeNetworkHandler:
    """At ``Events.STARTED``, after a ``CheckpointLoader`` listed before it has loaded the weights, rewrites ``network``
    for inference (:func:`bundle.network_optimization.optimize_for_inference`: BatchNorms folded, channels-last
    weights). Only for evaluation-only runs (``configs/evaluate.json``): the network can no longer be trained.
    """

    def __init__(self, network: nn.Module, enabled: bool = True) -> None:
        self.network = network
        self.enabled = enabled

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self._optimize)

    def _optimize(self, engine: Engine) -> None:
        optimize_for_inference(self.network)
