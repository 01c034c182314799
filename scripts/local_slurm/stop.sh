#!/usr/bin/env bash
# Stop the cluster started by start.sh: cancel its jobs, then end each daemon by its pid file.
# Leaves $LOCAL_SLURM_DIR/log for a post-mortem; start.sh wipes it on the next start.
set -uo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/opdgeom-slurm}
CONF=/etc/slurm/slurm.conf

ours() { [[ "$(readlink "$CONF")" == "$DIR/etc/slurm.conf" ]]; }

# Jobs first, and wait until they are gone: a job step ending after slurmd or munged is left behind.
if ours && squeue -h -o %i 2>/dev/null | xargs -r scancel; then
    for _ in $(seq 100); do [[ -z $(squeue -h -t pending,running,completing 2>/dev/null) ]] && break; sleep 0.1; done
fi

# Each daemon takes ~2 s to exit on SIGTERM: signal all of them, then wait for all.
# A stale pid file may name a recycled pid, so the process name must match too.
pids=()
for file in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid" "$DIR/run/munged.pid"; do
    name=$(basename "$file" .pid)
    pid=$(cat "$file" 2>/dev/null) || continue
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "${name%%-*}" ]] || continue
    kill "$pid" && pids+=("$pid") && echo "stopping $name ($pid)"
done
for _ in $(seq 100); do
    live=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && live+=("$pid"); done
    pids=("${live[@]}")
    (( ${#pids[@]} )) || break
    sleep 0.05
done
for pid in "${pids[@]}"; do kill -KILL "$pid" && echo "killed $pid: still running 5 s after SIGTERM"; done

if ours; then rm -f "$CONF" /etc/slurm/gres.conf; fi
rm -rf "$DIR/run" "$DIR/spool" "$DIR/munge"
