#!/usr/bin/env bash
# The GPU check of benchmarking/gpu_check.py on one CUDA GPU, in under 8 minutes: LA-preset training (fp16 AMP,
# 200 iterations), inference of the 20 LA test-split cases, a one-process torchrun (nccl); one JSON record in
# docs/results. Usage: bash scripts/gpu_check.sh <LA dataset dir> [extra flags, e.g. --authors_bench "<command>"]
set -euo pipefail
cd "$(dirname "$0")/.."
dataset_dir="${1:?usage: bash scripts/gpu_check.sh <LA dataset dir> [flags]}"
shift
timeout 480 python scripts/benchmark.py gpu --dataset_dir "$dataset_dir" "$@"
