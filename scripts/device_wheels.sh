#!/usr/bin/env bash
# Run here, before a session's call to the lent GPU machine: the wheels scripts/device_check.sh installs
# there, into .whl/ (ignored by git; the device call names it in `carry`).
#
# That machine has Python 3.12 with its own CUDA torch and most of this project's needs, but an older
# transformers and no TRL, datasets, polars, blake3 or jsonschema; nothing can be fetched from it. The
# wheels are this .venv's versions of what the GPU checks import and it lacks (found by recording the
# modules each check imports), built for CPython 3.12 on manylinux x86-64. polars' runtime wheel is
# 54 MB, and a call carries 64 MiB: it travels as an xz tarball of its installed files (~31 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${1:-.whl}
PACKAGES=(transformers trl datasets dill multiprocess blake3 polars polars-runtime-32
    jsonschema jsonschema-specifications referencing rpds-py)
# the 64 MiB carry limit less the working tree (~2 MB) and some headroom
MAX_MB=58

# a plain assignment, so that a package missing from the venv stops the script (set -e) with its name
pinned=$("$PY" - "${PACKAGES[@]}" <<'EOF'
import importlib.metadata as md
import sys

print(" ".join(f"{name}=={md.version(name)}" for name in sys.argv[1:]))
EOF
)
read -r -a pins <<<"$pinned"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/device_wheels.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
echo "device_wheels: downloading ${pins[*]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$tmp/wheels" "${pins[@]}"
runtime=("$tmp"/wheels/polars_runtime_32-*.whl)
mkdir "$tmp/runtime"
"$PY" -m zipfile -e "${runtime[0]}" "$tmp/runtime"
rm "${runtime[0]}"
echo "device_wheels: packing polars' runtime with xz (about a minute)"
tar -C "$tmp/runtime" -cf - . | xz -9 -T0 >"$tmp/wheels/polars_runtime_32.tar.xz"
size_mb=$(du -sm "$tmp/wheels" | cut -f1)
if ((size_mb > MAX_MB)); then
    echo "device_wheels: $size_mb MB of wheels, over the $MAX_MB MB a device call can carry beside the tree" >&2
    exit 1
fi
rm -rf "$DEST.partial"
mv "$tmp/wheels" "$DEST.partial"
rm -rf "$DEST"
mv "$DEST.partial" "$DEST"
ls -l "$DEST"
echo "device_wheels: $size_mb MB in $DEST; carry it: run(command=\"scripts/device_check.sh ...\", carry=[\"$DEST\"])"
