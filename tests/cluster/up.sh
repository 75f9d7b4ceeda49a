#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine for the `slurm` tests (Debian packages).
# Usage: up.sh STATE_DIR   (down.sh STATE_DIR stops exactly the daemons started here)
# Installs slurmctld, slurmd, slurm-client and munge with apt-get when they are missing
# (needs root). Writes /etc/slurm/{slurm,gres}.conf, since the executor plugin's nested srun
# drops SLURM_CONF; refuses to overwrite a config it did not write.
set -euo pipefail
state=${1:?usage: up.sh STATE_DIR}
mkdir -p "$state"
state=$(cd "$state" && pwd)
marker="# written by normrnn-repro tests/cluster/up.sh"

if [ "$(id -u)" != 0 ]; then echo "up.sh: needs root" >&2; exit 3; fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sinfo >/dev/null; then
  command -v apt-get >/dev/null || { echo "up.sh: no apt-get to install SLURM" >&2; exit 3; }
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
fi
if [ -f /etc/slurm/slurm.conf ] && ! grep -qF "$marker" /etc/slurm/slurm.conf; then
  echo "up.sh: /etc/slurm/slurm.conf exists and is not ours; not touching it" >&2; exit 3
fi

mkdir -p /etc/slurm "$state/spool/ctld" "$state/spool/d"
mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
cpus=$(nproc)
cat > /etc/slurm/slurm.conf <<CONF
$marker
ClusterName=normrnn
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
GresTypes=gpu
MinJobAge=300
ReturnToService=2
SchedulerParameters=batch_sched_delay=0
StateSaveLocation=$state/spool/ctld
SlurmdSpoolDir=$state/spool/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
cat > /etc/slurm/gres.conf <<CONF
$marker
# A fake GPU: jobs can request one; there is no device behind it.
Name=gpu File=/dev/null
CONF

if [ ! -S /run/munge/munge.socket.2 ]; then
  mkdir -p /run/munge /etc/munge /var/lib/munge /var/log/munge
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown -R munge:munge /run/munge /etc/munge /var/lib/munge /var/log/munge
  chmod 400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  cp /run/munge/munged.pid "$state/munged.pid"
fi
/usr/sbin/slurmctld -D -f /etc/slurm/slurm.conf >"$state/slurmctld.out" 2>&1 &
echo $! >"$state/slurmctld.started"
/usr/sbin/slurmd -D -N localhost -f /etc/slurm/slurm.conf >"$state/slurmd.out" 2>&1 &
echo $! >"$state/slurmd.started"

for _ in $(seq 1 60); do
  if sinfo -h -o '%T' 2>/dev/null | grep -qx idle; then
    echo "SLURM is up: $(sinfo -h -o '%N %T %G')"; exit 0
  fi
  sleep 0.5
done
echo "up.sh: the node did not become idle" >&2
tail -n 20 "$state"/slurmctld.out "$state"/slurmd.out >&2 || true
exit 1
