#!/bin/bash
# Start a one-node SLURM cluster on this machine (slurmctld + slurmd, munge
# authentication), for the SLURM tests. Run as root. Idempotent: running it
# again with the cluster up only checks that the node is idle.
#
# Installs nothing: it expects Debian's packages to be present
#   apt-get install -y slurm-wlm munge
#
# Environment:
#   SLURM_CONF           slurm.conf to write (default /etc/slurm/slurm.conf)
#   SLURM_WAIT_SECONDS   how long to wait for the node to become idle (60)
set -eu

conf=${SLURM_CONF:-/etc/slurm/slurm.conf}
wait_s=${SLURM_WAIT_SECONDS:-60}
host=$(hostname -s)
state_dir=/var/spool/slurmctld
spool_dir=/var/spool/slurmd
log_dir=/var/log/slurm
run_dir=/run/slurm

for exe in munged slurmctld slurmd sinfo scontrol; do
    command -v "$exe" >/dev/null || {
        echo "start_cluster: $exe not found (apt-get install -y slurm-wlm munge)" >&2
        exit 1
    }
done
if [ "$(id -u)" -ne 0 ]; then
    echo "start_cluster: must run as root (starts munged, slurmctld, slurmd)" >&2
    exit 1
fi

node_idle() {
    sinfo --noheader --nodes="$host" --format=%t 2>/dev/null | grep -qx "idle"
}

if node_idle; then
    echo "start_cluster: node $host is already idle"
    exit 0
fi

mkdir -p "$(dirname "$conf")" "$state_dir" "$spool_dir" "$log_dir" "$run_dir" /run/munge /var/log/munge
chown -R munge:munge /run/munge /var/log/munge 2>/dev/null || true

# --- munge: every SLURM message is signed with this host's key ---
if [ ! -s /etc/munge/munge.key ]; then
    # Debian's postinst normally creates it; make one if it is missing.
    if command -v mungekey >/dev/null; then
        mungekey --create --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    # munged refuses to run as root unless forced; it drops nothing we need.
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- munged --force
    else
        munged --force
    fi
    for _ in $(seq 1 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.5
    done
    munge -n | unmunge >/dev/null || { echo "start_cluster: munged did not start" >&2; exit 1; }
fi

# --- slurm.conf: this host's real CPU layout (slurmd -C), no accounting
# daemon, no cgroups (containers often lack them); jobs stay visible to
# `scontrol show job` for an hour after they end so tests can read the state.
hw=$(slurmd -C | head -n1 | sed -E 's/ RealMemory=[0-9]+//')
cat >"$conf.tmp" <<EOF
# One-node test cluster written by tests/slurm/start_cluster.sh
ClusterName=foxtest
SlurmctldHost=$host
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$state_dir
SlurmdSpoolDir=$spool_dir
SlurmctldPidFile=$run_dir/slurmctld.pid
SlurmdPidFile=$run_dir/slurmd.pid
SlurmctldLogFile=$log_dir/slurmctld.log
SlurmdLogFile=$log_dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$log_dir/jobcomp.log
MinJobAge=3600
ReturnToService=2
SlurmdTimeout=300
$hw State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
mv "$conf.tmp" "$conf"

running() {  # pid file names a live process
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

if running "$run_dir/slurmctld.pid"; then
    scontrol reconfigure || true
else
    slurmctld -f "$conf" || {
        echo "start_cluster: slurmctld failed to start; see $log_dir/slurmctld.log" >&2
        tail -n 20 "$log_dir/slurmctld.log" >&2 || true
        exit 1
    }
fi
for _ in $(seq 1 40); do
    scontrol ping 2>/dev/null | grep -q "is UP" && break
    sleep 0.5
done
scontrol ping | grep -q "is UP" || {
    echo "start_cluster: slurmctld did not come up; see $log_dir/slurmctld.log" >&2
    tail -n 20 "$log_dir/slurmctld.log" >&2 || true
    exit 1
}
if ! running "$run_dir/slurmd.pid"; then
    slurmd -f "$conf" || {
        echo "start_cluster: slurmd failed to start; see $log_dir/slurmd.log" >&2
        tail -n 20 "$log_dir/slurmd.log" >&2 || true
        exit 1
    }
fi

deadline=$((SECONDS + wait_s))
while ! node_idle; do
    state=$(sinfo --noheader --nodes="$host" --format=%t 2>/dev/null || true)
    case "$state" in
        down* | drain* | drng* | fail*)
            # Left over from an earlier run of this cluster: bring it back.
            scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
    esac
    if [ $SECONDS -ge $deadline ]; then
        echo "start_cluster: node $host not idle after ${wait_s}s (state: ${state:-unknown})" >&2
        tail -n 20 "$log_dir/slurmd.log" >&2 || true
        exit 1
    fi
    sleep 1
done
echo "start_cluster: node $host is idle"
sinfo
