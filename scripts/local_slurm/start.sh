#!/usr/bin/env bash
# Start a throwaway single-node Slurm (slurmctld + slurmd + a private munged) on loopback, as root,
# so the workflow's Slurm path runs for real on a laptop or CI runner. Idempotent: a running cluster
# is left alone. Stop it with scripts/local_slurm/stop.sh. State, logs and pid files live in
# $LOCAL_SLURM_DIR (default /tmp/opdgeom-slurm); the only file outside it is the symlink
# /etc/slurm/slurm.conf (plus gres.conf), because the job step plugin strips SLURM_CONF before its
# inner srun and Slurm then reads the compiled-in path.
#
# Each node is declared larger than this machine (SlurmdParameters=config_overrides) with two fake
# H100s (character devices cloned from /dev/null), so the real per-rule requests of profiles/slurm
# (16 CPUs, 128 GB, --gpus=h100:1) are scheduled as they would be on a GPU node.
# LOCAL_SLURM_NODES=N (default 2) starts N slurmd daemons on this host, nodes n1..nN, each on its
# own port, so multi-node jobs (sbatch --nodes=2, srun across nodes) run for real.
set -euo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/opdgeom-slurm}
NODES=${LOCAL_SLURM_NODES:-2}
CONF=/etc/slurm/slurm.conf
[[ $NODES =~ ^[1-9][0-9]?$ ]] || { echo "start.sh: LOCAL_SLURM_NODES must be 1..99, got '$NODES'" >&2; exit 2; }
NODELIST="n[1-$NODES]"

[[ $EUID -eq 0 ]] || { echo "start.sh: must run as root (daemons, /etc/slurm, mknod)" >&2; exit 2; }

# Running means: the pid file names a live process of that name (a stale file may name a recycled pid).
alive() {
    local pid
    pid=$(cat "$DIR/run/$1.pid" 2>/dev/null) && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "${1%%-*}" ]]
}

if alive munged && alive slurmctld && alive slurmd-n1 && [[ $(sinfo -h -N -o %N 2>/dev/null | sort -u | wc -l) == "$NODES" ]]; then
    echo "local Slurm already running ($DIR)"
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    # --no-install-recommends keeps out the GUI (sview) and slurmdbd: job status comes from squeue.
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
fi

if [[ -e $CONF && "$(readlink "$CONF")" != "$DIR/etc/slurm.conf" ]]; then
    echo "start.sh: $CONF exists and is not ours; refusing to replace a real cluster's config" >&2
    exit 2
fi

# A half-started or crashed earlier cluster: stop what is left, then start from clean state.
"$(dirname "$0")/stop.sh" >/dev/null
rm -rf "${DIR:?}"/{etc,run,log,spool,dev,munge}
mkdir -p "$DIR"/{etc,run,log,spool/ctld,spool/d,dev}
chmod 755 "$DIR"

# munged refuses a socket folder others can write to; Slurm reaches it through AuthInfo=socket=.
install -d -m 711 -o munge -g munge "$DIR/munge"
dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
chown munge:munge "$DIR/munge/munge.key"
chmod 400 "$DIR/munge/munge.key"
runuser -u munge -- munged --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
ln -sf "$DIR/munge/munged.pid" "$DIR/run/munged.pid"

for i in 0 1; do mknod -m 666 "$DIR/dev/gpu$i" c 1 3; done

cat > "$DIR/etc/slurm.conf" <<CONF
ClusterName=opdgeom-local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
# No slurmdbd: squeue is the job-status source and scontrol shows what each job got, for an hour.
MinJobAge=3600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
GresTypes=gpu
# Partition names match the placeholders in profiles/slurm; a node covers the largest request.
# All nodes live on this host (NodeHostname=localhost), told apart by their slurmd ports.
NodeName=$NODELIST NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001-$((17000 + NODES)) CPUs=64 RealMemory=512000 Gres=gpu:h100:2 State=UNKNOWN
PartitionName=cpu Nodes=$NODELIST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODELIST MaxTime=INFINITE State=UP
CONF

cat > "$DIR/etc/gres.conf" <<CONF
AutoDetect=off
NodeName=$NODELIST Name=gpu Type=h100 File=$DIR/dev/gpu[0-1]
CONF

mkdir -p /etc/slurm
ln -sfn "$DIR/etc/slurm.conf" "$CONF"
ln -sfn "$DIR/etc/gres.conf" /etc/slurm/gres.conf

slurmctld
for i in $(seq "$NODES"); do slurmd -N "n$i"; done

# Ready when every node has registered and is idle.
for _ in $(seq 100); do
    state=$(sinfo -h -N -o %T 2>/dev/null | sort -u | tr '\n' ' ' || true)
    idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
    [[ $idle == "$NODES" ]] && { echo "local Slurm up ($DIR, $NODES nodes): $(sinfo -h -o '%P %T %D %G' | tr '\n' ' ')"; exit 0; }
    sleep 0.1
done
echo "start.sh: not all $NODES nodes idle after 10 s (states: ${state:-none}); see $DIR/log" >&2
exit 1
