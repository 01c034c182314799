#!/usr/bin/env bash
# On the lent GPU machine, as one device call (carry .whl/): the GPU numbers benchmarks/RESULTS.md still
# lacks. Make .whl/ here first with scripts/device_wheels.sh.
#
#   scripts/device_check.sh [STEP ...]     steps of scripts/gpu_check.sh (default: memory plans smoke)
#
# A session has 15 device minutes and 10 a call, so two calls, the second at once (the machine stays
# warm 30 s and keeps the installed wheels):
#   scripts/device_check.sh memory plans smoke
#   scripts/device_check.sh vs_trl monitor
# It installs the wheels into $DEVICE_SITE (/tmp/opdgeom-site) once per machine, prints the versions it
# runs with, then runs gpu_check.sh with a GPU required (GPU_CHECK_REQUIRED=1: where torch cannot use
# one it fails and says why) and GPU_CHECK_TIMEOUT=240 s per benchmark. The whole output also goes to
# $OUT/device_check.log when OUT is set (the device tool's folder that comes back). The exit status is
# gpu_check.sh's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHEELS=${DEVICE_WHEELS:-.whl}
SITE=${DEVICE_SITE:-/tmp/opdgeom-site}
LOG=${OUT:+$OUT/device_check.log}

install_wheels() {
    if [[ ! -d $WHEELS ]]; then
        echo "device_check: no $WHEELS/ here (scripts/device_wheels.sh makes it): $PY's own packages only"
        return
    fi
    if [[ ! -f $SITE/.installed ]]; then
        rm -rf "$SITE"
        "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
        local tarball
        for tarball in "$WHEELS"/*.tar.xz; do
            # Python's own lzma, not tar -J: the image need not have xz
            [[ -e $tarball ]] && "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' "$tarball" "$SITE"
        done
        touch "$SITE/.installed"
    fi
    echo "device_check: packages from $WHEELS/ installed in $SITE"
}

versions() {
    "$PY" - <<'EOF'
import importlib.metadata as md
import platform

names = ["torch", "transformers", "tokenizers", "huggingface_hub", "accelerate", "trl", "datasets", "pyarrow",
         "polars", "numpy", "safetensors"]
found = []
for name in names:
    try:
        found.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        found.append(f"{name} missing")
print(f"device_check: Python {platform.python_version()}; " + ", ".join(found))
EOF
}

run() {
    install_wheels
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    echo "device_check: commit ${OPDGEOM_COMMIT:-unknown (no .git in the copy; set OPDGEOM_COMMIT)}"
    versions
    if (($#)); then
        export GPU_CHECKS="$*"
    fi
    GPU_CHECK_REQUIRED=${GPU_CHECK_REQUIRED:-1} GPU_CHECK_TIMEOUT=${GPU_CHECK_TIMEOUT:-240} PY=$PY scripts/gpu_check.sh
}

if [[ -n $LOG ]]; then
    run "$@" 2>&1 | tee "$LOG"
    exit "${PIPESTATUS[0]}"
fi
run "$@"
