#!/usr/bin/env bash
# N processes on this machine joined over loopback, CPU collectives (gloo): a way to try the
# multi-host code path without a cluster (tests/test_launchers.py runs it with 2 processes).
#   launch/local_cpu_processes.sh 2 configs/quickstart_pretrain.py workdirs/qs_2proc [--config.x=y ...]
# Logs: WORKDIR.process_<i>.log. DRY_RUN=1 prints each process's command instead of running it.
# DMFUSE overrides the command (default: dmfuse), e.g. DMFUSE="python -m dmfuse_jax".
set -euo pipefail
N=${1:?number of processes}; CONFIG=${2:?config file}; WORKDIR=${3:?workdir}; shift 3
PORT=${PORT:-$((20000 + RANDOM % 20000))}
read -r -a CMD <<< "${DMFUSE:-dmfuse}"
if [[ "${DRY_RUN:-0}" != 0 ]]; then
  for ((i = 0; i < N; i++)); do
    echo "process $i: JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$N" \
      "JAX_PROCESS_ID=$i ${CMD[*]} train --config $CONFIG --workdir $WORKDIR $*"
  done
  exit 0
fi
mkdir -p "$(dirname "$WORKDIR")"
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i \
    "${CMD[@]}" train --config "$CONFIG" --workdir "$WORKDIR" "$@" > "$WORKDIR.process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
tail -n 3 "$WORKDIR.process_0.log"
exit $status
