#!/usr/bin/env bash
# A real one-node SLURM on this machine for tests/test_slurm.py (Debian/Ubuntu, run as root, no
# systemd needed): installs slurm-wlm and munge when absent, writes a one-node slurm.conf (this
# host, its CPUs and memory, one GPU generic resource backed by /dev/null), starts munged,
# slurmctld and slurmd, and waits until the node is idle. No accounting database: status checks
# use squeue, which needs a large MinJobAge (3600 s here). Stop it with stop-local-slurm.sh.
#
# Exit status: 0 up; 3 packages could not be installed; 4 the daemons did not come up;
# 5 this machine already has a SLURM configuration of its own (left untouched).
set -uo pipefail

MARK="# written by lungreg tests/slurm/start-local-slurm.sh"
CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)
CPUS=${LUNGREG_SLURM_CPUS:-$(nproc)}
# slurmd drains a node that claims more memory than it has: 80 % of the physical memory
MEMORY=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
LOGS=/var/log/slurm
HERE=$(cd "$(dirname "$0")" && pwd)
STARTED=/run/lungreg-slurm.pidfiles   # what this script started, for stop-local-slurm.sh

fail() { echo "start-local-slurm: $2" >&2; exit "$1"; }

[ "$(id -u)" = 0 ] || fail 3 "must run as root (it installs packages and starts daemons)"

if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
  fail 5 "$CONF exists and was not written by this script; not touching this machine's SLURM"
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || fail 3 "slurm-wlm/munge are not installed and there is no apt-get"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q slurm-wlm munge >/tmp/lungreg-slurm-apt.log 2>&1; then
    # stale package lists: update once and retry
    apt-get update -q >>/tmp/lungreg-slurm-apt.log 2>&1
    apt-get install -y -q slurm-wlm munge >>/tmp/lungreg-slurm-apt.log 2>&1 \
      || fail 3 "apt-get install slurm-wlm munge failed: $(tail -n 3 /tmp/lungreg-slurm-apt.log | tr '\n' ' ')"
  fi
fi

# the daemons (and anything a job writes relative to them) work in a folder of their own, never
# in the caller's folder (a checkout): /tmp/lungreg-slurm
mkdir -p /tmp/lungreg-slurm && cd /tmp/lungreg-slurm || fail 4 "cannot enter /tmp/lungreg-slurm"

# a previous run of this script that was not stopped: stop what it started first
"$HERE/stop-local-slurm.sh" >/dev/null 2>&1 || true
: > "$STARTED"

# munge (its key is created by the package's postinst); an already running munged is reused
mkdir -p /run/munge && chown munge:munge /run/munge
if ! { [ -f /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; }; then
  [ -f /etc/munge/munge.key ] || fail 4 "/etc/munge/munge.key is missing"
  runuser -u munge -- /usr/sbin/munged || fail 4 "munged did not start"
  echo /run/munge/munged.pid >> "$STARTED"
fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGS"
chown slurm:slurm /var/spool/slurmctld "$LOGS"
cat > "$CONF" <<CONF
$MARK
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# finished jobs stay visible to squeue for an hour: the executor's squeue status checks need
# MinJobAge >= 3 x its first check delay (the recipe measured 600 s as enough), and the test reads
# every job's state and GPU request after a run that can take more than 10 minutes
MinJobAge=3600
# without it a job that asks no memory takes the whole node and jobs run one at a time
DefMemPerCPU=1000
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEMORY Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
# a fake GPU: slurm 22.05 drops file-less gpu GRES ("Removing file-less GPU"), so File=/dev/null
echo "NodeName=$HOST Name=gpu Count=1 File=/dev/null" > /etc/slurm/gres.conf

# -c: start from a clean state (no jobs of an earlier run)
echo /run/slurmctld.pid >> "$STARTED"; echo /run/slurmd.pid >> "$STARTED"
/usr/sbin/slurmctld -c || fail 4 "slurmctld did not start: $(tail -n 5 $LOGS/slurmctld.log 2>/dev/null | tr '\n' ' ')"
/usr/sbin/slurmd || fail 4 "slurmd did not start: $(tail -n 5 $LOGS/slurmd.log 2>/dev/null | tr '\n' ' ')"
for _ in $(seq 60); do
  sinfo -h -o %T 2>/dev/null | grep -qx idle && { sinfo -N -o "%N %T %c %m %G"; exit 0; }
  sleep 0.5
done
fail 4 "the node did not become idle within 30 s: $(sinfo -N -o '%N %T %E' 2>&1 | tr '\n' ' ') $(tail -n 2 $LOGS/slurmd.log 2>/dev/null | tr '\n' ' ')"
