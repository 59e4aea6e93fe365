#!/usr/bin/env bash
# Stops the daemons that start-local-slurm.sh started (the pid files it listed in
# /run/lungreg-slurm.pidfiles); packages and configuration stay.
STARTED=/run/lungreg-slurm.pidfiles
[ -f "$STARTED" ] || exit 0
tac "$STARTED" | while read -r pidfile; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill "$pid" 2>/dev/null; then
    echo "stopped $pidfile ($pid)"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
done
rm -f "$STARTED"
exit 0
