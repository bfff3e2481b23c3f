#!/usr/bin/env bash
# N processes on this machine joined over loopback, CPU collectives (gloo): a way to try the
# multi-host code path without a cluster (the tests do the same).
#   launch/local_cpu_processes.sh 2 configs/quickstart_pretrain.py workdirs/qs_2proc
set -euo pipefail
N=${1:?number of processes}; CONFIG=${2:?config file}; WORKDIR=${3:?workdir}; shift 3
PORT=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i \
    dmfuse train --config "$CONFIG" --workdir "$WORKDIR" "$@" > "$WORKDIR.process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
tail -n 3 "$WORKDIR.process_0.log"
exit $status
