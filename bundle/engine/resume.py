"""What a resume checkpoint holds beyond weights, optimizer and schedule, so that a run killed at any iteration and
resumed repeats the uninterrupted run bit for bit (on CPU): every random generator and each data stream's position.

* :func:`capture_rng` / :func:`restore_rng`: torch (CPU and CUDA), numpy's and Python's global generators, as plain
  tensors and tuples (checkpoints are read with ``weights_only=True``).
* :class:`ResumableStream`: a ``DataLoader`` whose interrupted pass can be restarted at the same batch with the
  same sampler permutation, random crops and worker seeds.
"""

from __future__ import annotations

import random
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from monai.transforms import Transform


def _numpy_state(state: tuple) -> Dict[str, Any]:
    """``np.random.RandomState.get_state()`` as tensors and numbers (``weights_only`` loads no numpy arrays)."""
    _, keys, position, has_gauss, gauss = state
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}  # fmt: skip


def _numpy_tuple(state: Dict[str, Any]) -> tuple:
    keys = state["keys"].cpu().numpy().astype(np.uint32)
    return "MT19937", keys, state["pos"], state["has_gauss"], state["gauss"]


def capture_rng() -> Dict[str, Any]:
    """The state of every global generator: ``torch`` (CPU), ``cuda`` (one per device, empty without CUDA),
    ``numpy``, ``python``."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": _numpy_state(np.random.get_state()),
        "python": random.getstate(),
    }


def restore_rng(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (CUDA states only when CUDA is available and they were saved)."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    np.random.set_state(_numpy_tuple(state["numpy"]))
    random.setstate(state["python"])


def transform_generators(transform: Any) -> List[np.random.RandomState]:
    """Every ``np.random.RandomState`` of a (possibly nested) MONAI transform: the ``R`` of each ``Randomizable``,
    found as MONAI's ``set_rnd`` finds them (``Compose.transforms``, ``OneOf``, a dictionary transform's inner
    transform), in a fixed order."""
    found: List[np.random.RandomState] = []
    seen = set()

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, np.random.RandomState):
            found.append(obj)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value)
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, Transform):
            for value in vars(obj).values():
                visit(value)

    visit(transform)
    return found


class ResumableStream:
    """Iterates a ``DataLoader`` pass by pass and can restart an interrupted pass at the same batch.

    When a pass starts, the generators that decide it are recorded: the global ones (the sampler's permutation and
    the workers' base seed are drawn from torch's) and the dataset's transform generators (random crops, flips;
    used in this process when ``num_workers=0``). :meth:`state_dict` holds that record, the pass count and the
    number of batches drawn from the current pass. After :meth:`load_state_dict`, the next ``iter()`` sets the
    recorded generators, starts the pass again, draws and discards the batches already used, and puts the live
    global generators back: the rest of the pass is the one the interrupted run would have drawn. Restarting costs
    the loading of those batches (a crop of cached volumes with ``CacheDataset``).

    Hand-written because neither torch's ``DataLoader`` nor ignite can resume inside a pass: ignite restarts an
    interrupted epoch with a fresh permutation and fresh crops.

    Args:
        loader: a ``DataLoader`` (anything with ``__iter__``/``__len__``; ``loader.dataset.transform`` if any).
        set_sampler_epoch: call ``loader.sampler.set_epoch(pass index)`` before each pass (a ``DistributedSampler``
            reshuffles per pass); the labeled stream leaves that to MONAI's trainer, which does it per epoch.
    """

    def __init__(self, loader: Any, set_sampler_epoch: bool = False) -> None:
        self.loader = loader
        self.set_sampler_epoch = set_sampler_epoch
        self.passes = 0
        self.position = 0
        self._pass_start: Optional[Dict[str, Any]] = None
        self._pending: Optional[Dict[str, Any]] = None
        self._generators = transform_generators(getattr(getattr(loader, "dataset", None), "transform", None))

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        """The loader's other attributes (``sampler``, ``dataset``: MONAI's workflow and the distributed runner read
        them from the trainer's ``data_loader``)."""
        if name == "loader":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)

    def _transform_states(self) -> List[Dict[str, Any]]:
        return [_numpy_state(generator.get_state()) for generator in self._generators]

    def _set_transform_states(self, states: List[Dict[str, Any]]) -> None:
        if len(states) != len(self._generators):
            raise ValueError(
                f"checkpoint holds {len(states)} transform generator states, the data pipeline has "
                f"{len(self._generators)}: it was written with other transforms."
            )
        for generator, state in zip(self._generators, states):
            generator.set_state(_numpy_tuple(state))

    def _start_pass(self) -> Iterator:
        sampler = getattr(self.loader, "sampler", None)
        if self.set_sampler_epoch and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.passes)
        self.passes += 1
        self.position = 0
        return iter(self.loader)

    def __iter__(self) -> Iterator:
        pending, self._pending = self._pending, None
        if pending is not None and pending["passes"] > 0 and pending["position"] < len(self.loader):
            return self._counted(self._restart(pending))
        self._pass_start = {"rng": capture_rng(), "transforms": self._transform_states()}
        return self._counted(self._start_pass())

    def _restart(self, pending: Dict[str, Any]) -> Iterator:
        live = capture_rng()
        self._pass_start = pending["pass_start"]
        restore_rng(self._pass_start["rng"])
        self._set_transform_states(self._pass_start["transforms"])
        self.passes = pending["passes"] - 1
        iterator = self._start_pass()
        for _ in range(pending["position"]):
            next(iterator)
        self.position = pending["position"]
        restore_rng(live)
        return iterator

    def _counted(self, iterator: Iterator) -> Iterator:
        for batch in iterator:
            self.position += 1
            yield batch

    def state_dict(self) -> Dict[str, Any]:
        """``passes`` started, ``position`` (batches drawn from the current pass), ``pass_start`` (the generators
        when it started) and ``transforms`` (the transform generators now)."""
        return {
            "passes": self.passes,
            "position": self.position,
            "pass_start": self._pass_start,
            "transforms": self._transform_states(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from ``state``: the next ``iter()`` restarts the interrupted pass (or starts the next one)."""
        self._set_transform_states(state["transforms"])
        self.passes, self.position = state["passes"], state["position"]
        self._pending = state
