"""Progress a user can see: window progress inside a volume at inference, and a figure of the training curves.

* :class:`ProgressSlidingWindowInferer`: MONAI's ``SlidingWindowInferer`` that logs how many window batches of the
  current volume are done (a 112x112x80 LA volume at strides 18x18x4 is hundreds of windows, a minute or more on a
  CPU); MONAI's own ``progress`` needs ``tqdm``, which is not a dependency.
* :class:`TrainingCurves`: at the end of training, ``output_dir/training_curves.png`` with every logged loss term
  per iteration (the same values as the console and TensorBoard).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Sequence

import torch
from ignite.engine import Engine, Events
from monai.data.utils import dense_patch_slices
from monai.inferers import SlidingWindowInferer
from monai.inferers.utils import _get_scan_interval
from monai.utils import ensure_tuple_rep, fall_back_tuple

from bundle.engine.trainer import loss_terms


def window_batches(spatial_shape: Sequence[int], roi_size: Any, overlap: Any, sw_batch_size: int) -> int:
    """Network calls ``sliding_window_inference`` makes for one volume of ``spatial_shape``: its windows (the volume
    padded to at least the ROI, windows placed as MONAI places them) in batches of ``sw_batch_size``."""
    roi = fall_back_tuple(roi_size, spatial_shape)
    padded = [max(size, r) for size, r in zip(spatial_shape, roi)]
    overlaps = ensure_tuple_rep(overlap, len(roi))
    windows = len(dense_patch_slices(padded, roi, _get_scan_interval(padded, roi, len(roi), overlaps)))
    return math.ceil(windows / sw_batch_size)


class ProgressSlidingWindowInferer(SlidingWindowInferer):
    """``SlidingWindowInferer`` whose ``__call__`` logs ``window batches done/total`` of each volume at every
    ``log_fraction`` of the total (and at the end), with the elapsed seconds. Outputs are unchanged: the network is
    only wrapped in a counter.

    Args:
        log_fraction: the share of a volume's window batches between two log lines (0.25: four lines a volume).
        name: the logger.
        kwargs: those of ``SlidingWindowInferer``.
    """

    def __init__(
        self, *args: Any, log_fraction: float = 0.25, name: str = "bundle.engine.progress", **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 < log_fraction <= 1.0:
            raise ValueError(f"log_fraction must be in (0, 1], got {log_fraction}.")
        self.log_fraction = float(log_fraction)
        self.logger = logging.getLogger(name)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``inputs`` ``(B, C, *spatial)``; see ``SlidingWindowInferer.__call__``."""
        total = inputs.shape[0] * window_batches(inputs.shape[2:], self.roi_size, self.overlap, self.sw_batch_size)
        step = max(1, math.ceil(total * self.log_fraction))
        start, done = time.perf_counter(), [0]

        def counted(*call_args: Any, **call_kwargs: Any) -> Any:
            output = network(*call_args, **call_kwargs)
            done[0] += 1
            if done[0] % step == 0 or done[0] == total:
                seconds = time.perf_counter() - start
                self.logger.info(f"sliding window: {done[0]}/{total} window batches ({seconds:.0f} s)")
            return output

        return super().__call__(inputs, counted, *args, **kwargs)


class TrainingCurves:
    """Collects ``loss`` and every ``loss_<name>`` of each iteration and writes them as one figure, loss against
    iteration (log scale), to ``path`` when training completes.

    Args:
        path: the PNG to write (``train.json``: ``output_dir/training_curves.png``).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.iterations: List[int] = []
        self.values: Dict[str, List[float]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _record(self, engine: Engine) -> None:
        self.iterations.append(engine.state.iteration)
        for name, value in loss_terms(engine.state.output).items():
            self.values.setdefault(name, [math.nan] * (len(self.iterations) - 1)).append(value)
        for series in self.values.values():  # a term that was off this iteration (ramps, stages) is a gap
            series.extend([math.nan] * (len(self.iterations) - len(series)))

    def _write(self, engine: Engine) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axis = plt.subplots(figsize=(8, 4.5))
        for name, series in self.values.items():
            axis.plot(self.iterations, series, label=name, linewidth=2.0 if name == "loss" else 1.0)
        axis.set_xlabel("iteration")
        axis.set_ylabel("loss (unweighted terms; loss = weighted sum)")
        if all(v > 0 for series in self.values.values() for v in series if not math.isnan(v)):
            axis.set_yscale("log")
        axis.legend(fontsize="small", ncol=2)
        axis.grid(alpha=0.3)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fig.savefig(self.path, dpi=100)
        plt.close(fig)
