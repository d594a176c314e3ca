"""Weight ramps over training iterations."""

from __future__ import annotations

import math


def sigmoid_rampup(current: float, length: float) -> float:
    """``exp(-5 (1 - clip(current, 0, length) / length)^2)``, rising from ``exp(-5)`` at 0 to 1 at ``length``
    (Laine & Aila); 1 when ``length == 0``."""
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(current, 0.0), length) / length
    return math.exp(-5.0 * phase * phase)


def contrastive_ramp(iteration: int, max_iterations: int, max_value: float = 0.1, step: int = 1) -> float:
    """``lambda_c(t) = max_value * sigmoid_rampup(step * floor(t / step), t_max)`` (spec section 4.9; C's printed
    ``0.1 e^{4 (1 - t/t_max)^2}`` has a sign typo and the code uses 5).

    ``step=1`` gives the smooth ``0.1 exp(-5 (1 - min(t / t_max, 1))^2)``. ``step=150, max_iterations=6000``
    reproduces the released code's ``0.1 exp(-5 (1 - min(floor(t / 150), 40) / 40)^2)`` exactly: 0.000674 at
    ``t = 0``, 0.028650 at 3000, 0.099688 at 5999 and 0.1 from 6000 on. ``iteration`` is 0-based.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}.")
    return max_value * sigmoid_rampup(step * (iteration // step), max_iterations)
