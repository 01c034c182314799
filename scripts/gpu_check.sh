#!/usr/bin/env bash
# One GPU, well under 8 minutes: OPD steps at Qwen3-8B / Qwen3-32B layer shapes (a few layers, random
# weights from the config, no hub) through the training code's FSDP2 bf16 + activation-checkpointing
# path, printing tokens/s per phase and peak memory next to the memory plan's prediction; then the
# plans of the 8B families on 8 x 80 GB. Record the numbers in benchmarks/RESULTS.md.
# Without a GPU it says so and exits 0. Extra arguments go to the benchmark (e.g. --layers 8).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU on $(hostname); nothing measured (GPU numbers in benchmarks/RESULTS.md stay missing)"
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 420 "$PY" benchmarks/bench_train_memory.py --layers 4 --teacher-layers 2 --rows 8 --seq-len 2048 --steps 3 "$@"
for family in qwen3-8b llama3-8b; do
    "$PY" -m opdgeom memory-plan --family "$family" --gpus 8 --gpu-mem-gb 80
done
