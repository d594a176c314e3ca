"""Weight ramps and schedules over training iterations (docs/methods/README.md §2), in one place."""

from __future__ import annotations

import math
from typing import Optional, Tuple


def sigmoid_rampup(current: float, length: float) -> float:
    """``r(t, L) = exp(-5 (1 - clip(t, 0, L) / L)^2)``, rising from ``exp(-5)`` at 0 to 1 at ``L`` (Laine & Aila);
    1 when ``L == 0``."""
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(current, 0.0), length) / length
    return math.exp(-5.0 * phase * phase)


def stepped_rampup(iteration: int, rampup_iters: int, step: int = 1) -> float:
    """``r(step floor(t / step), L)``: :func:`sigmoid_rampup` evaluated in steps of ``step`` iterations, in
    ``[exp(-5), 1]``; the consistency ramp of Mean Teacher, UA-MT and CPS (docs/methods/mean_teacher.md, Eq. MT-3).

    ``step=150, rampup_iters=6000`` is the released code's ``r(floor(t / 150), 40)``: 0.006738 at ``t = 0``, 0.28650
    at 3000, 0.99688 at 5999 and 1 from 6000 on; ``step=1`` is the smooth ramp; ``rampup_iters=0`` gives 1.
    ``iteration`` is the 0-based ``t`` of the loss being built.
    """
    if step < 1:
        raise ValueError(f"rampup step must be >= 1, got {step}.")
    if rampup_iters < 0:
        raise ValueError(f"rampup_iters must be >= 0, got {rampup_iters}.")
    return sigmoid_rampup(step * (iteration // step), rampup_iters)


def contrastive_ramp(iteration: int, max_iterations: int, max_value: float = 0.1, step: int = 1) -> float:
    """``lambda_c(t) = max_value * r(step floor(t / step), t_max)`` (docs/methods/dual_network.md, Eq. D-9; the
    printed ``0.1 e^{4 (1 - t/t_max)^2}`` has a sign typo and the released code uses 5): :func:`stepped_rampup`
    over the whole run.

    ``step=1`` gives the smooth ``0.1 exp(-5 (1 - min(t / t_max, 1))^2)``. ``step=150, max_iterations=6000``
    reproduces the released code's ``0.1 exp(-5 (1 - min(floor(t / 150), 40) / 40)^2)`` exactly: 0.000674 at
    ``t = 0``, 0.028650 at 3000, 0.099688 at 5999 and 0.1 from 6000 on. ``iteration`` is 0-based.
    """
    return max_value * stepped_rampup(iteration, max_iterations, step)


def ramp_schedule(max_iterations: int, rampup_iters: Optional[int], rampup_step: Optional[int]) -> Tuple[int, int]:
    """``(L, step)`` of a :func:`stepped_rampup`: ``L = rampup_iters``, or ``max_iterations`` (the whole run) when
    ``None``; ``step = rampup_step``, or ``max(1, L // 40)`` (the released code's 40 steps: 150 for 6000) when
    ``None``. Validates both."""
    length = max_iterations if rampup_iters is None else int(rampup_iters)
    step = max(1, length // 40) if rampup_step is None else int(rampup_step)
    stepped_rampup(0, length, step)
    return length, step
