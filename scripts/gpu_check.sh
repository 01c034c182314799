#!/usr/bin/env bash
# One GPU, well under 8 minutes: OPD steps at Qwen3-8B / Qwen3-32B layer shapes (a few layers, random
# weights from the config, no hub) through the training code's FSDP2 bf16 + activation-checkpointing
# path, printing tokens/s per phase and peak memory next to the memory plan's prediction; then the
# plans of the 8B families on 8 x 80 GB (training) and one evaluate job; then benchmarks/gpu_smoke.py
# (two ranks at real layer shapes, >= 3 OPD steps, one evaluate job). Record the numbers in
# benchmarks/RESULTS.md.
# Extra arguments go to the benchmark (e.g. --layers 8).
#
# GPU_CHECKS picks the steps, in order (default "memory plans smoke", the cluster's checks):
#   memory   benchmarks/bench_train_memory.py    plans    opdgeom memory-plan (8B families)
#   smoke    benchmarks/gpu_smoke.py             vs_trl   benchmarks/bench_vs_trl.py --gpu (needs TRL)
#   monitor  benchmarks/bench_monitor.py --gpu
# GPU_CHECK_TIMEOUT: seconds per benchmark (default 420). Every step runs; the first failure's status
# is the script's.
#
# Exit status: 0 when it measured, and 0 without measuring only where nothing says a GPU was expected
# ("no GPU here, nothing to measure"). 1 when it was to measure and could not, with the reason torch
# gives (opdgeom.device): GPU_CHECK_REQUIRED=1 (a GPU machine's check), nvidia-smi lists GPUs that
# torch cannot use (a CPU torch, a driver older than R580 for the CUDA 13 wheel), or Slurm granted
# this job GPUs / OPDGEOM_DEVICE=cuda. 2 for a bad GPU_CHECK_REQUIRED, GPU_CHECKS or GPU_CHECK_TIMEOUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
STEPS=${GPU_CHECKS:-memory plans smoke}
for step in $STEPS; do
    case $step in
        memory | plans | smoke | vs_trl | monitor) ;;
        *) echo "gpu_check: GPU_CHECKS has an unknown step '$step' (memory, plans, smoke, vs_trl, monitor)" >&2; exit 2 ;;
    esac
done
LIMIT=${GPU_CHECK_TIMEOUT:-420}
if [[ ! $LIMIT =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_check: GPU_CHECK_TIMEOUT must be a whole number of seconds, got '$LIMIT'" >&2
    exit 2
fi
case ${GPU_CHECK_REQUIRED:-0} in
    0) ;;
    1) export OPDGEOM_DEVICE=cuda ;;
    *) echo "gpu_check: GPU_CHECK_REQUIRED must be 0 or 1, got '$GPU_CHECK_REQUIRED'" >&2; exit 2 ;;
esac
if [[ ${OPDGEOM_DEVICE:-} != cuda ]] && command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "gpu_check: nvidia-smi lists GPUs on $(hostname): they must be measured"
    export OPDGEOM_DEVICE=cuda
fi
if ! device=$("$PY" -m opdgeom.device); then
    echo "gpu_check: a GPU was expected on $(hostname) and torch cannot use it (above): nothing measured" >&2
    exit 1
fi
if [[ $device == cpu ]]; then
    echo "gpu_check: no GPU here ($(hostname)), nothing to measure (GPU numbers in benchmarks/RESULTS.md stay missing)"
    exit 0
fi
echo "gpu_check: measuring on $device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

memory() {
    timeout "$LIMIT" "$PY" benchmarks/bench_train_memory.py --layers 4 --teacher-layers 2 --rows 8 --seq-len 2048 --steps 3 "$@"
}
plans() {
    local family
    for family in qwen3-8b llama3-8b; do
        "$PY" -m opdgeom memory-plan --family "$family" --gpus 8 --gpu-mem-gb 80 || return
        "$PY" -m opdgeom memory-plan --family "$family" --gpu-mem-gb 80 --evaluate || return
    done
}
# The cluster path end to end (train under torchrun with colocated engines, then evaluate): on vLLM
# where the vLLM environment is here (PY_VLLM), otherwise on transformers engines, said so.
smoke() {
    local py_vllm=${PY_VLLM:-$PY}
    if "$py_vllm" -c "import vllm" 2>/dev/null; then
        timeout "$LIMIT" "$py_vllm" benchmarks/gpu_smoke.py --engine vllm
    else
        echo "gpu_check: no vLLM in $py_vllm (set PY_VLLM to the envs/vllm-gpu.yaml python): gpu_smoke on transformers engines"
        timeout "$LIMIT" "$PY" benchmarks/gpu_smoke.py --engine hf
    fi
}
# Issue 28's GPU form: as many alternating rounds as fit in the limit (the first one always runs).
vs_trl() {
    timeout "$LIMIT" "$PY" benchmarks/bench_vs_trl.py --gpu --rounds 4 --max-wall-s $((LIMIT * 2 / 3))
}
monitor() {
    timeout "$LIMIT" "$PY" benchmarks/bench_monitor.py --gpu
}
status=0
for step in $STEPS; do
    echo "gpu_check: step $step"
    rc=0
    "$step" "$@" || rc=$?
    if ((rc != 0)); then
        echo "gpu_check: step $step failed (exit $rc)" >&2
        ((status != 0)) || status=$rc
    fi
done
exit "$status"
