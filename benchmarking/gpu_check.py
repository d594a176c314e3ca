"""The GPU check: everything the GPU path needs, measured in one short run on one CUDA GPU.

``python scripts/benchmark.py gpu --dataset_dir ../shared/data/LA`` (or ``bash scripts/gpu_check.sh``) runs, each
probe in its own process:

1. ``train``: the LA preset (``configs/datasets/la.json``: 112×112×80 patches, batch 2 + 2) for ``iterations``
   iterations under ``precision`` auto (fp16 AMP on a GPU), activations kept (a GPU has the memory): seconds per
   iteration and peak GPU memory.
2. ``authors``: the authors' released training step for the same patch and iterations, when their code's mirrors
   are given (``authors_bench``: a command that prints ``bench_reference.py``'s JSON); otherwise recorded as not
   timed, with the reason.
3. ``inference``: the bundle's ensemble over each LA test-split case (the cases after the first 60 of
   ``train.list``), at the papers' window grid, with the ``configs/inference.json`` network rewrite: seconds per
   volume (the volume read from its h5 file, so real shapes), peak GPU memory.
4. ``torchrun``: ``configs/multi_gpu_train.json`` with one process (``nccl`` on a GPU, ``gloo`` on a CPU) on the
   embedded synthetic data for a few iterations: exit status and seconds.

One JSON record ``gpu_check_<gpu model>_<commit>.json`` with the GPU model. On a machine without CUDA it refuses to
run unless ``allow_cpu`` (the tests run every probe on the CPU with tiny sizes that way).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import h5py
import torch
from monai.inferers import SlidingWindowInferer

from benchmarking.runs import (
    BENCHMARK_TRAIN_CASES,
    CONFIG_DIR,
    git_commit,
    hardware,
    parse_bundle,
    peak_rss_gib,
    run_isolated,
    write_json,
)
from bundle.data.datalists import read_case_list
from bundle.engine.precision import AutocastInference
from bundle.inference.folder import strides_to_overlap
from bundle.inference.optimization import optimize_for_inference

LA_CONFIGS = (f"{CONFIG_DIR}/train.json", f"{CONFIG_DIR}/datasets/la.json")


def device_name() -> str:
    """The CUDA device's name, or ``"cpu"``."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def la_test_cases(dataset_dir: str, list_file: str = "train.list", count: int = 20) -> List[str]:
    """The benchmark's test cases of an LA-layout dataset: up to ``count`` cases after the first
    :data:`~benchmarking.runs.BENCHMARK_TRAIN_CASES` of ``list_file`` (all cases after the first half when the list
    is shorter, as in a small test dataset)."""
    cases = read_case_list(os.path.join(dataset_dir, list_file))
    first_test = BENCHMARK_TRAIN_CASES if len(cases) > BENCHMARK_TRAIN_CASES else len(cases) // 2
    return cases[first_test : first_test + count]


def time_case_inference(
    dataset_dir: str,
    cases: Sequence[str],
    patch: Sequence[int],
    strides: Sequence[int],
    config_files: Sequence[str] = LA_CONFIGS,
    sw_batch_size: int = 4,
    overrides: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Seconds per volume of the bundle's ensemble (random weights: the time does not depend on them) over the LA
    cases ``cases`` (``<dataset_dir>/<case>/mri_norm2.h5``), windows on the GPU, the volume stitched on the CPU as
    ``configs/inference.json`` does. The first case is also run once untimed (CUDA kernels and cuDNN plans)."""
    parser = parse_bundle(config_files, {"patch_size": list(patch), **(overrides or {})})
    device = parser.get_parsed_content("device")
    network = optimize_for_inference(parser.get_parsed_content("network_def").to(device).eval())
    predictor = AutocastInference(network, "auto", device)
    inferer = SlidingWindowInferer(
        roi_size=list(patch),
        sw_batch_size=sw_batch_size,
        overlap=strides_to_overlap(patch, strides),
        sw_device=device,
        device="cpu",
    )
    rows = []
    for index, case in enumerate([cases[0], *cases]):
        with h5py.File(os.path.join(dataset_dir, case, "mri_norm2.h5"), "r") as handle:
            image = torch.as_tensor(handle["image"][()], dtype=torch.float32)[None, None]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            inferer(image, predictor)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if index:  # index 0 is the warm-up pass
            rows.append({"case": case, "shape": list(image.shape[2:]), "seconds": time.perf_counter() - start})
    result = {
        "cases": rows,
        "seconds_per_volume": sum(row["seconds"] for row in rows) / len(rows),
        "precision": predictor.precision,
        "peak_rss_gib": peak_rss_gib(),
    }
    if torch.cuda.is_available():
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def torchrun_smoke(
    iterations: int = 4, overrides: Optional[Dict[str, Any]] = None, timeout: int = 300
) -> Dict[str, Any]:
    """One-process ``torchrun`` of ``configs/multi_gpu_train.json`` on the embedded synthetic data for
    ``iterations`` iterations (nccl on a GPU, gloo on a CPU), outputs in a temporary folder; ``overrides`` are
    passed as ``--key value``."""
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            "-m", "monai.bundle", "run", "training",
            "--config_file", f"['{CONFIG_DIR}/train.json','{CONFIG_DIR}/multi_gpu_train.json']",
            "--max_iterations", str(iterations), "--val_interval", str(iterations),
            "--output_dir", os.path.join(folder, "runs"), "--model_dir", os.path.join(folder, "models"),
        ]  # fmt: skip
        for key, value in (overrides or {}).items():
            command += [f"--{key}", json.dumps(value)]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
        model_written = os.path.isfile(os.path.join(folder, "models", "model.pt"))
    return {
        "backend": "nccl" if torch.cuda.is_available() else "gloo",
        "returncode": result.returncode,
        "model_written": model_written,
        "seconds": seconds,
        "iterations": iterations,
        "output_tail": (result.stdout + result.stderr)[-1500:] if result.returncode else "",
    }


def authors_timing(authors_bench: Optional[str], timeout: int = 600) -> Dict[str, Any]:
    """The authors' training step, timed by ``authors_bench`` (a shell command printing the JSON of
    ``../shared/tools/reference_bench/bench_reference.py`` or an equivalent GPU harness), or why it was not timed."""
    if not authors_bench:
        return {"timed": False, "reason": "no authors_bench command given (their code's mirrors were not available)"}
    result = subprocess.run(authors_bench, shell=True, capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        return {"timed": False, "reason": f"exit {result.returncode}: {result.stderr[-800:]}"}
    return {"timed": True, "command": authors_bench, "output": json.loads(result.stdout)}


def gpu_check(
    dataset_dir: str,
    iterations: int = 200,
    patch: Sequence[int] = (112, 112, 80),
    strides: Sequence[int] = (18, 18, 4),
    test_cases: int = 20,
    torchrun_iterations: int = 4,
    authors_bench: Optional[str] = None,
    results_dir: str = "docs/results",
    allow_cpu: bool = False,
    overrides: Optional[Dict[str, Any]] = None,
) -> str:
    """Run the four probes of this module's docstring and write one record; returns its path. ``overrides`` (bundle
    settings, e.g. ``{"base_width": 4}`` for a quick CPU run) apply to every probe and are recorded."""
    if not torch.cuda.is_available() and not allow_cpu:
        raise RuntimeError("no CUDA device: the GPU check needs one (allow_cpu runs it on the CPU, for tests).")
    cases = la_test_cases(dataset_dir, count=test_cases)
    if not cases:
        raise ValueError(f"{dataset_dir}/train.list: no test-split case to segment.")
    patch = [int(size) for size in patch]
    record: Dict[str, Any] = {
        "kind": "gpu_check",
        "device": device_name(),
        "command": f"python scripts/benchmark.py gpu --dataset_dir {dataset_dir} --iterations {iterations}",
        "commit": git_commit(),
        "hardware": hardware(),
        "patch": patch,
        "strides": list(strides),
        "overrides": dict(overrides or {}),
    }
    training = {"patch_size": patch, "activation_checkpointing": False, **(overrides or {})}
    record["train"] = run_isolated(
        "time_training", config_files=list(LA_CONFIGS), overrides=training, iterations=iterations
    )
    record["authors"] = authors_timing(authors_bench)
    record["inference"] = run_isolated(
        "time_case_inference",
        module="benchmarking.gpu_check",
        dataset_dir=dataset_dir,
        cases=cases,
        patch=patch,
        strides=list(strides),
        overrides=dict(overrides or {}),
    )
    record["torchrun"] = torchrun_smoke(torchrun_iterations, overrides)
    slug = re.sub(r"[^a-z0-9]+", "_", record["device"].lower()).strip("_")
    return write_json(record, results_dir, f"gpu_check_{slug}_{record['commit'][:7]}")
