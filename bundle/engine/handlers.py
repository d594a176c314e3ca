"""Small ignite handlers that MONAI lacks: a progress line with ETA, deploy weights written only on success, atomic
resume checkpoints and their loader, and the inference rewrite of a loaded network."""

from __future__ import annotations

import glob
import logging
import os
import time
from typing import Any, Dict, List, Mapping, Optional

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from torch import nn

from bundle.data.checks import stop
from bundle.inference.model_settings import settings_path, write_model_settings
from bundle.inference.optimization import optimize_for_inference

#: infix of the temporary files that :func:`save_atomically` writes and renames.
PARTIAL = ".partial-"


def save_atomically(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` through a temporary file in the same folder, flushed to disk and renamed:
    ``path`` is either the old complete file or the new complete file, never a partial one. The temporary file is
    removed if writing fails."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}{PARTIAL}{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)


def remove_partial_files(folder: str) -> List[str]:
    """Delete the temporary files that an interrupted :func:`save_atomically` left in ``folder``; returns them."""
    stale = glob.glob(os.path.join(glob.escape(folder), f".*{PARTIAL}*"))
    for path in stale:
        os.remove(path)
    return stale


def non_finite_entries(state: Mapping[str, Any]) -> List[str]:
    """Names of the floating-point tensors of a state dict that hold a NaN or an infinity."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]


class ProgressLogger:
    """Logs ``iteration t/T, loss, (each unweighted term), s/it, ETA`` every ``interval`` iterations (and at the
    last one).

    MONAI's ``StatsHandler`` prints every term but neither the iteration budget nor the time left, which is what a
    user waiting on a CPU run wants to see.
    """

    def __init__(self, max_iterations: int, interval: int = 10, name: str = "bundle.engine.progress") -> None:
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
    with those of a crashed or interrupted run. The file is written under a temporary name and renamed
    (:func:`save_atomically`), so it is never half-written, and weights holding a NaN or an infinity are refused
    (``FloatingPointError`` naming the tensors; the previous file stays). With ``settings``
    (:func:`bundle.inference.model_settings.describe_model`), the model's settings file is written next to it, after it.
    """

    def __init__(self, network: nn.Module, path: str, settings: Optional[Dict[str, Any]] = None) -> None:
        self.network = network
        self.path = path
        self.settings = settings

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        state = self.network.state_dict()
        bad = non_finite_entries(state)
        if bad:
            raise FloatingPointError(f"{self.path} not written: non-finite values in {', '.join(bad[:5])}")
        save_atomically(state, self.path)
        logging.getLogger("bundle.engine.progress").info(f"saved {self.path}")
        if self.settings is not None:
            write_model_settings(self.settings, settings_path(self.path))


class AtomicCheckpointSaver:
    """Resume checkpoints ``{name: obj.state_dict()}``: ``checkpoint_iteration=N.pt`` every ``save_interval``
    iterations (the ``n_saved`` latest kept) and ``final_filename`` when training completes (not on an exception).

    Replaces MONAI's ``CheckpointSaver``, which writes in place (``atomic=False``), lets ignite delete the oldest file
    before the new one is written (a kill then leaves no valid checkpoint) and also saves on an exception. Here each
    file is written by :func:`save_atomically`, an older one is deleted only after the new one is complete, and
    temporary files of an interrupted save are removed when the saver is attached. A DDP-wrapped module is saved
    unwrapped (as ignite's ``Checkpoint``), so the file resumes in a single process too. Attach it after every
    other ``ITERATION_COMPLETED`` handler, so that the saved generator states are those the next iteration uses.

    Args:
        save_dir: folder of the checkpoints (created).
        save_dict: objects with ``state_dict()``, e.g. ``{"method", "optimizer", "lr_scheduler", "trainer"}``.
        save_interval: iterations between checkpoints; 0 disables them.
        n_saved: how many interval checkpoints of this run to keep.
        save_final: write ``final_filename`` at ``Events.COMPLETED``.
        final_filename: name of the final checkpoint.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Dict[str, Any],
        save_interval: int = 0,
        n_saved: int = 1,
        save_final: bool = True,
        final_filename: str = "checkpoint_final.pt",
    ) -> None:
        if n_saved < 1:
            raise ValueError(f"n_saved must be >= 1, got {n_saved}.")
        self.save_dir = save_dir
        self.save_dict = save_dict
        self.save_interval = int(save_interval)
        self.n_saved = int(n_saved)
        self.save_final = save_final
        self.final_filename = final_filename
        self.saved: List[str] = []

    def attach(self, engine: Engine) -> None:
        os.makedirs(self.save_dir, exist_ok=True)
        for path in remove_partial_files(self.save_dir):
            logging.getLogger("bundle.engine.progress").info(f"removed {path}, left by an interrupted save")
        if self.save_interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval), self._save_interval)
        if self.save_final:
            engine.add_event_handler(Events.COMPLETED, self._save_final)

    def checkpoint(self) -> Dict[str, Any]:
        """The state dict of every object of ``save_dict`` (DDP / DataParallel unwrapped)."""
        parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
        objects = {name: obj.module if isinstance(obj, parallel) else obj for name, obj in self.save_dict.items()}
        return {name: obj.state_dict() for name, obj in objects.items()}

    def _save_interval(self, engine: Engine) -> None:
        path = os.path.join(self.save_dir, f"checkpoint_iteration={engine.state.iteration}.pt")
        save_atomically(self.checkpoint(), path)
        if path not in self.saved:
            self.saved.append(path)
        while len(self.saved) > self.n_saved:
            old = self.saved.pop(0)
            if os.path.exists(old):
                os.remove(old)

    def _save_final(self, engine: Engine) -> None:
        save_atomically(self.checkpoint(), os.path.join(self.save_dir, self.final_filename))


class ResumeLoader:
    """Loads a resume checkpoint (:class:`AtomicCheckpointSaver`'s, or MONAI's ``CheckpointSaver``'s) into the objects
    of ``load_dict`` at ``Events.STARTED``.

    Replaces MONAI's ``CheckpointLoader``, which reads the file only once the engine runs, so that a truncated file
    ends in a bare ``EOFError`` inside a long traceback: here the file is read and checked in :meth:`attach`, before
    training, and a missing, unreadable or incomplete file stops the run with one line naming it. The file is read
    once (``weights_only=True``). As MONAI's loader, it keeps the engine's ``max_epochs``.

    Args:
        load_path: the checkpoint file.
        load_dict: objects with ``load_state_dict``, under the names they were saved with.
        map_location: ``torch.load``'s ``map_location``.
    """

    def __init__(self, load_path: str, load_dict: Dict[str, Any], map_location: Any = None) -> None:
        self.load_path = load_path
        self.load_dict = load_dict
        self.map_location = map_location
        self.checkpoint: Optional[Dict[str, Any]] = None

    def attach(self, engine: Engine) -> None:
        self.checkpoint = self.read()
        engine.add_event_handler(Events.STARTED, self)

    def read(self) -> Dict[str, Any]:
        """The checkpoint's content; stops naming the file when it is missing, unreadable or lacks an entry."""
        path = self.load_path
        if not os.path.isfile(path):
            stop("Cannot resume:", [f"{path}: checkpoint file not found"])
        try:
            checkpoint = torch.load(path, map_location=self.map_location, weights_only=True)
        except Exception as err:  # a truncated zip, a 0-byte file, a foreign pickle: all end here
            reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
            stop("Cannot resume:", [f"{path}: not a complete checkpoint, truncated or corrupt ({reason})"])
        names = sorted(checkpoint) if isinstance(checkpoint, dict) else []
        missing = [name for name in self.load_dict if name not in names]
        if missing:
            stop("Cannot resume:", [f"{path}: checkpoint lacks {missing} (has {names})"])
        return checkpoint

    def __call__(self, engine: Engine) -> None:
        prior_max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=self.load_dict, checkpoint=self.checkpoint)
        engine.state.max_epochs = prior_max_epochs
        self.checkpoint = None
        logging.getLogger("bundle.engine.progress").info(
            f"resumed from {self.load_path} at iteration {engine.state.iteration}"
        )


class OptimizeNetworkHandler:
    """At ``Events.STARTED``, after a ``CheckpointLoader`` listed before it has loaded the weights, rewrites ``network``
    for inference (:func:`bundle.inference.optimization.optimize_for_inference`: BatchNorms folded, channels-last
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
