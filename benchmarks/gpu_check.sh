#!/usr/bin/env bash
# The GPU check: one prepared script for a GPU machine (one H200: 139 GB, 16 CPU cores), about
# 8 minutes of run time, so a rerun fits in a fifteen-minute lease. It writes one table.
#
# How to run it
#   On a bare GPU machine with internet access, from the repository root:
#       pip install -e . && bash benchmarks/gpu_check.sh            # uses the CUDA torch already installed
#   On a GPU machine without internet (this workplace's device machine: python3 3.12 with CUDA torch,
#   transformers and peft, but no ray / deepspeed / datasets), prepare wheels here first:
#       bash benchmarks/gpu_wheels.sh          # downloads cp312 wheels into .whl/ (git-ignored)
#   then on the GPU machine (carry .whl):
#       bash benchmarks/gpu_check.sh --wheels .whl
#   Dry run on CPU (what CI runs through tests/test_gpu_check.py; tiny stand-ins, minutes):
#       bash benchmarks/gpu_check.sh --cpu
#
# Steps (benchmarks/gpu_check.py): the tiny model trained with scaling.use_gpu=true in bf16 at ZeRO-2
# and ZeRO-3 (NCCL, one worker), with the reference stage on the GPU; `catdpo-ray eval` on the GPU;
# steady-state tokens/s and model FLOPs utilisation of a random-initialised ~1B Llama (bf16, sdpa,
# and flash-attention when importable), through the trainer and as a bare forward/backward ceiling;
# `catdpo-ray plan` for that job against torch.cuda.max_memory_allocated. Output: $OUT (default
# /tmp/catdpo-gpu-check)/gpu_check.md and gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
ARGS=()
WHEELS=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if [[ -n "$WHEELS" ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="/tmp/site/bin:$PATH"
fi
export PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_check.py "${ARGS[@]}"
