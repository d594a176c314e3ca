"""Where the inference time goes: every convolution of the inference network timed on one batch of windows.

:func:`conv_profile` (``python scripts/benchmark.py conv_profile``) runs the sliding-window forward of
``configs/inference.json`` (both subnets, norms folded, channels-last) on ``batch`` random windows under each
precision, times each convolution through forward hooks, and compares its arithmetic rate with that of a large matrix
product in the same precision on the same threads; the higher of that and the fastest convolution's rate (among those
with at least 1 % of the convolution time) is the ``ceiling``, the best the CPU's kernels reach here. The ``ideal``
forward is the measured one with every convolution at the ceiling: how much faster any kernel-level work could make
the same computation. :func:`conv_profile_sections` is its section of ``docs/RESULTS.md``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from benchmarking.report import source_line
from benchmarking.runs import CONFIG_DIR, git_commit, hardware, parse_bundle, write_json
from bundle.engine.precision import AutocastInference
from bundle.inference.optimization import optimize_for_inference

Record = Dict[str, Any]
CONVOLUTIONS = (nn.Conv3d, nn.ConvTranspose3d)


def convolution_flops(conv: nn.Module, input_shape: Sequence[int], output_shape: Sequence[int]) -> float:
    """Multiply-adds x 2 of one call: each output voxel of a convolution (each *input* voxel of a transposed one)
    meets ``in_channels / groups * out_channels * prod(kernel)`` weights. Shapes are ``(N, C, *spatial)``."""
    voxels = math.prod(output_shape[2:] if isinstance(conv, nn.Conv3d) else input_shape[2:])
    weights = conv.in_channels // conv.groups * conv.out_channels * math.prod(conv.kernel_size)
    return 2.0 * input_shape[0] * voxels * weights


def layer_name(conv: nn.Module, output_shape: Sequence[int]) -> str:
    """``"Conv3d 16→32 k3 s2 @56×56×40"``: type, channels, kernel and stride (first axis), output size."""
    return (f"{type(conv).__name__} {conv.in_channels}→{conv.out_channels} k{conv.kernel_size[0]} "
            f"s{conv.stride[0]} @{'×'.join(map(str, output_shape[2:]))}")  # fmt: skip


def matmul_gflops(precision: str, size: int = 2048, repeats: int = 3) -> float:
    """GFLOP/s of a ``size``-square matrix product in ``precision`` (``bf16`` or ``fp32``), best of ``repeats``."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
    torch.matmul(a, b)  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best / 1e9


def profile_forward(predictor: nn.Module, x: torch.Tensor, repeats: int) -> Tuple[float, Dict[str, Dict[str, float]]]:
    """Mean wall seconds of ``predictor(x)`` over ``repeats`` runs (after one warm-up) and, per layer name, its
    ``calls``, ``seconds`` and ``gflop`` per forward."""
    layers: Dict[str, Dict[str, float]] = {}
    started: Dict[int, float] = {}

    def before(module: nn.Module, args: Tuple[torch.Tensor, ...]) -> None:
        started[id(module)] = time.perf_counter()

    def after(module: nn.Module, args: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seconds = time.perf_counter() - started.pop(id(module))
        entry = layers.setdefault(layer_name(module, output.shape), {"calls": 0, "seconds": 0.0, "gflop": 0.0})
        entry["calls"] += 1
        entry["seconds"] += seconds
        entry["gflop"] += convolution_flops(module, args[0].shape, output.shape) / 1e9

    handles = []
    for module in predictor.modules():
        if isinstance(module, CONVOLUTIONS):
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        with torch.no_grad():
            predictor(x)
            layers.clear()
            start = time.perf_counter()
            for _ in range(repeats):
                predictor(x)
            seconds = (time.perf_counter() - start) / repeats
    finally:
        for handle in handles:
            handle.remove()
    for entry in layers.values():
        entry.update({key: entry[key] / repeats for key in ("calls", "seconds", "gflop")})
    return seconds, layers


def conv_profile(
    method: str = "dual_journal",
    patch: Sequence[int] = (112, 112, 80),
    batch: int = 4,
    precisions: Sequence[str] = ("bf16", "fp32"),
    repeats: int = 2,
    results_dir: str = "docs/results",
) -> str:
    """Profile the inference network of ``method`` on ``batch`` random windows of ``patch`` under each precision (see
    the module docstring). Writes ``<results_dir>/conv_profile_<method>_<patch>.json``; returns its path."""
    configs = [f"{CONFIG_DIR}/train.json", f"{CONFIG_DIR}/methods/{method}.json"]
    parser = parse_bundle(configs, {"patch_size": list(patch)})
    network = optimize_for_inference(parser.get_parsed_content("network_def"))
    x = torch.randn(batch, parser.get_parsed_content("in_channels"), *patch, generator=torch.Generator().manual_seed(0))
    results = {}
    for precision in precisions:
        predictor = AutocastInference(network, precision, "cpu")
        seconds, layers = profile_forward(predictor, x, repeats)
        conv_seconds = sum(entry["seconds"] for entry in layers.values())
        busy = [
            entry["gflop"] / entry["seconds"] for entry in layers.values() if entry["seconds"] >= 0.01 * conv_seconds
        ]
        ceiling = max([matmul_gflops(predictor.precision)] + busy)
        gflop = sum(entry["gflop"] for entry in layers.values())
        results[precision] = {
            "forward_seconds": seconds,
            "conv_seconds": conv_seconds,
            "conv_gflop": gflop,
            "ceiling_gflops": ceiling,
            "ideal_forward_seconds": seconds - conv_seconds + gflop / ceiling,
            "layers": [
                {"layer": name, **entry} for name, entry in sorted(layers.items(), key=lambda kv: -kv[1]["seconds"])
            ],
        }
    command = f'python scripts/benchmark.py conv_profile --method {method} --patch "{list(patch)}" --batch {batch}'
    record = {"kind": "conv_profile", "method": method, "patch": list(patch), "batch": batch,
              "threads": torch.get_num_threads(), "command": command, "commit": git_commit(), "hardware": hardware(),
              "precisions": results}  # fmt: skip
    return write_json(record, results_dir, f"conv_profile_{method}_{'x'.join(map(str, patch))}")


def conv_profile_sections(records: Sequence[Tuple[str, Record]], top: int = 6) -> List[str]:
    """Markdown lines for the :func:`conv_profile` records: per precision the forward's seconds, the convolutions'
    share and rate against the matrix-product rate, the ideal forward; then the ``top`` slowest layers."""
    if not records:
        return []
    lines = [
        "## Where the inference time goes",
        "",
        "One batch of sliding windows through the inference network (both subnets, norms folded, channels-last),",
        "each convolution timed through forward hooks. The ceiling is the higher of a 2048² matrix product's rate in",
        "the same precision on the same threads and the fastest convolution's (at least 1 % of the convolution time):",
        "the best the CPU's kernels reach here. *Ideal* is the forward with every convolution at the ceiling and",
        "everything else as measured: kernel work cannot make the same computation faster than that; only fewer",
        "windows or a smaller network can.",
        "",
        "| record | precision | forward s | convolutions: s (share) | conv GFLOP/s | ceiling GFLOP/s | ideal s "
        "(of measured) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in records:
        for precision, p in r["precisions"].items():
            rate = p["conv_gflop"] / p["conv_seconds"]
            lines.append(f"| `{name}` | {precision} | {p['forward_seconds']:.2f} | {p['conv_seconds']:.2f} "
                         f"({100 * p['conv_seconds'] / p['forward_seconds']:.0f} %) | {rate:.0f} "
                         f"| {p['ceiling_gflops']:.0f} | {p['ideal_forward_seconds']:.2f} "
                         f"({100 * p['ideal_forward_seconds'] / p['forward_seconds']:.0f} %) |")  # fmt: skip
    lines += ["", f"Slowest convolutions (the first precision of each record, top {top}):", ""]
    lines += ["| record | layer | calls | s per forward | GFLOP/s |", "|---|---|---|---|---|"]
    for name, r in records:
        precision, p = next(iter(r["precisions"].items()))
        for layer in p["layers"][:top]:
            lines.append(f"| `{name}` ({precision}) | {layer['layer']} | {layer['calls']:.0f} | {layer['seconds']:.3f} "
                         f"| {layer['gflop'] / layer['seconds']:.0f} |")  # fmt: skip
    lines.append("")
    for name, r in records:
        lead = f"batch {r['batch']} of {'×'.join(map(str, r['patch']))} windows, {r['threads']} torch threads; "
        lines.append(source_line(name, r, lead))
    lines.append("")
    return lines
