#!/usr/bin/env bash
# Installs bubblewrap (bwrap), the namespace sandbox opdgeom.sandbox runs model-written programs in.
# Idempotent: does nothing when bwrap is already on PATH. As root it installs with apt-get; otherwise
# it prints the command to run and exits 1 (it never asks for a password).
set -euo pipefail
if command -v bwrap >/dev/null 2>&1; then
    echo "bubblewrap present: $(bwrap --version)"
    exit 0
fi
CMD="apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap"
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "bubblewrap (bwrap) is missing; as root run: $CMD" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap
echo "bubblewrap installed: $(bwrap --version)"
