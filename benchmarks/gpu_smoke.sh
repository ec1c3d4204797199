#!/usr/bin/env bash
# GPU smoke run and benchmark (see benchmarks/gpu_smoke.py): the SDPA kernel check, then 20 bf16 steps of the
# Llama-3.2-1B shape at seq 2048 over NCCL on 1 GPU (and 2 when there are 2), printing tokens/s and MFU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m benchmarks.gpu_smoke "$@"
