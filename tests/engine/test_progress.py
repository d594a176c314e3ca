"""Window progress of the sliding-window inferer: the count matches MONAI's windows, outputs are unchanged."""

import logging
import math

import pytest
import torch
from monai.inferers import SlidingWindowInferer

from bundle.engine.progress import ProgressSlidingWindowInferer, window_batches


@pytest.mark.parametrize(
    "shape, roi, overlap, batch", [((20, 18, 12), (8, 8, 8), 0.5, 2), ((7, 9, 5), (8, 8, 8), 0.25, 3)]
)
def test_window_batches_counts_the_network_calls(shape, roi, overlap, batch):
    calls = []

    def network(x):
        calls.append(x.shape[0])
        return x

    SlidingWindowInferer(roi, sw_batch_size=batch, overlap=overlap)(torch.zeros(1, 1, *shape), network)
    assert window_batches(shape, roi, overlap, batch) == len(calls)


def test_progress_inferer_logs_every_quarter_and_returns_the_same_output(caplog):
    caplog.set_level(logging.INFO, logger="bundle.engine.progress")
    image = torch.randn(1, 1, 20, 18, 12, generator=torch.Generator().manual_seed(0))
    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    plain = SlidingWindowInferer((8, 8, 8), sw_batch_size=1, overlap=0.5)(image, net)
    shown = ProgressSlidingWindowInferer((8, 8, 8), sw_batch_size=1, overlap=0.5)(image, net)
    torch.testing.assert_close(shown, plain, rtol=0, atol=0)
    total = window_batches((20, 18, 12), (8, 8, 8), 0.5, 1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sliding window")]
    assert len(lines) == 4 and lines[-1].startswith(f"sliding window: {total}/{total} window batches")
    assert lines[0].startswith(f"sliding window: {math.ceil(total / 4)}/{total}")
