#!/usr/bin/env bash
# Stop the daemons that up.sh STATE_DIR started (by their PIDs), and remove its config.
set -uo pipefail
state=${1:?usage: down.sh STATE_DIR}
for name in slurmd slurmctld; do
  if [ -f "$state/$name.started" ]; then
    kill "$(cat "$state/$name.started")" 2>/dev/null
  fi
done
sleep 1
for name in slurmd slurmctld; do
  [ -f "$state/$name.started" ] && kill -9 "$(cat "$state/$name.started")" 2>/dev/null
  rm -f "$state/$name.started"
done
if [ -f "$state/munged.pid" ]; then kill "$(cat "$state/munged.pid")" 2>/dev/null; rm -f "$state/munged.pid"; fi
marker="# written by normrnn-repro tests/cluster/up.sh"
for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
  grep -qF "$marker" "$f" 2>/dev/null && rm -f "$f"
done
exit 0
