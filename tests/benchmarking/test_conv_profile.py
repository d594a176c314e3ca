"""The convolution profile of the inference network: FLOP counts on hand-made layers, the hooks' bookkeeping on a
tiny network, and the report section on a hand-made record (no timing is asserted)."""

import pytest
import torch
from torch import nn

from benchmarking.conv_profile import conv_profile_sections, convolution_flops, layer_name, profile_forward


def test_convolution_flops_on_hand_made_layers():
    conv = nn.Conv3d(2, 3, kernel_size=3, padding=1)
    # 2 samples x 4*4*4 output voxels x (2 * 3 * 27) weights x 2 flops
    assert convolution_flops(conv, (2, 2, 4, 4, 4), (2, 3, 4, 4, 4)) == 2 * 64 * 2 * 3 * 27 * 2
    grouped = nn.Conv3d(4, 4, kernel_size=1, groups=2)
    assert convolution_flops(grouped, (1, 4, 2, 2, 2), (1, 4, 2, 2, 2)) == 1 * 8 * (2 * 4 * 1) * 2
    up = nn.ConvTranspose3d(4, 2, kernel_size=2, stride=2)  # counted per *input* voxel: 8 of them
    assert convolution_flops(up, (1, 4, 2, 2, 2), (1, 2, 4, 4, 4)) == 1 * 8 * (4 * 2 * 8) * 2
    assert layer_name(up, (1, 2, 4, 4, 4)) == "ConvTranspose3d 4→2 k2 s2 @4×4×4"


def test_profile_forward_counts_every_call_per_forward():
    net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv3d(2, 2, 3, padding=1), nn.Conv3d(2, 2, 1))
    net.append(net[2])  # the same layer called twice
    x = torch.randn(1, 1, 4, 4, 4)
    seconds, layers = profile_forward(net, x, repeats=2)
    assert seconds > 0
    assert set(layers) == {"Conv3d 1→2 k3 s1 @4×4×4", "Conv3d 2→2 k3 s1 @4×4×4", "Conv3d 2→2 k1 s1 @4×4×4"}
    assert layers["Conv3d 2→2 k3 s1 @4×4×4"]["calls"] == 2  # per forward, averaged over the repeats
    assert layers["Conv3d 1→2 k3 s1 @4×4×4"]["gflop"] == pytest.approx(2 * 64 * 2 * 27 / 1e9)
    assert not net[0]._forward_hooks and not net[0]._forward_pre_hooks  # hooks removed


def test_section_reports_share_rate_and_ideal():
    layers = [{"layer": "Conv3d 1→16 k7 s1 @112×112×80", "calls": 1, "seconds": 0.5, "gflop": 50.0}]
    record = {
        "batch": 4,
        "patch": [112, 112, 80],
        "threads": 2,
        "commit": "abc1234",
        "hardware": "test CPU",
        "command": "python scripts/benchmark.py conv_profile",
        "precisions": {
            "bf16": {"forward_seconds": 2.0, "conv_seconds": 1.5, "conv_gflop": 300.0, "ceiling_gflops": 400.0,
                     "ideal_forward_seconds": 1.25, "layers": layers},  # fmt: skip
        },
    }
    lines = conv_profile_sections([("conv_profile_x.json", record)])
    row = next(line for line in lines if line.startswith("| `conv_profile_x.json` | bf16 |"))
    assert "| 2.00 | 1.50 (75 %) | 200 | 400 | 1.25 (62 %) |" in row
    assert any("| Conv3d 1→16 k7 s1 @112×112×80 | 1 | 0.500 | 100 |" in line for line in lines)
    assert conv_profile_sections([]) == []
