#!/usr/bin/env bash
# Stop the cluster started by start.sh: cancel its jobs, then end each daemon by its pid file.
# Leaves $LOCAL_SLURM_DIR/log for a post-mortem; start.sh wipes it on the next start.
set -uo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/opdgeom-slurm}
CONF=/etc/slurm/slurm.conf

ours() { [[ "$(readlink "$CONF")" == "$DIR/etc/slurm.conf" ]]; }

if ours && [[ -s $DIR/run/slurmctld.pid ]]; then
    scancel --quiet --full "$(squeue -h -o %i | tr '\n' ' ')" 2>/dev/null || true
fi

for name in slurmd slurmctld munged; do
    pidfile=$DIR/run/$name.pid
    [[ -s $pidfile ]] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "stopped $name ($pid)"
done

if ours; then rm -f "$CONF" /etc/slurm/gres.conf; fi
rm -rf "$DIR/run" "$DIR/spool" "$DIR/munge"
