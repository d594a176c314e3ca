"""LA benchmark: ``accuracy`` runs, ``speed`` probes and the generated ``docs/RESULTS.md``.

Run from the bundle root, e.g.::

    python scripts/benchmark.py accuracy --dataset_dir /data/LA --method dual_journal --protocol cpu
    python scripts/benchmark.py speed --patch "[64,64,32]"
    python scripts/benchmark.py memory --volume "[512,512,300]"
    python scripts/benchmark.py agreement --record docs/results/la_cpu_dual_journal_k8_seed1337.json
    python scripts/benchmark.py window_grid --record docs/results/la_cpu_dual_journal_k8_seed1337.json
    python scripts/benchmark.py rescore --record docs/results/la_cpu_dycon_fp32_torch_init_k8_seed7.json
    python scripts/benchmark.py default_precision --seed 0
    python scripts/benchmark.py conv_profile --patch "[112,112,80]"
    python scripts/benchmark.py gpu --dataset_dir /path/to/LA
    python scripts/benchmark.py oracle --dataset_dir /path/to/LA --mirror <UA-MT git dir> --method mean_teacher
    python scripts/benchmark.py report
"""

import os
import sys

import fire

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarking.conv_profile import conv_profile  # noqa: E402
from benchmarking.gpu_check import gpu_check  # noqa: E402
from benchmarking.oracle import oracle  # noqa: E402
from benchmarking.overlap import rescore  # noqa: E402
from benchmarking.precision import agreement, default_precision  # noqa: E402
from benchmarking.results_page import report  # noqa: E402
from benchmarking.runs import accuracy, inference_memory, speed  # noqa: E402
from benchmarking.window_grid import window_grid  # noqa: E402
from bundle.config.booleans import boolean_command  # noqa: E402
from bundle.config.errors import cli  # noqa: E402

if __name__ == "__main__":
    with cli():
        fire.Fire(
            {
                "accuracy": boolean_command(accuracy),
                "speed": boolean_command(speed),
                "memory": inference_memory,
                "report": report,
                "agreement": agreement,
                "window_grid": window_grid,
                "rescore": rescore,
                "default_precision": default_precision,
                "conv_profile": conv_profile,
                "gpu": gpu_check,
                "oracle": oracle,
            }
        )
