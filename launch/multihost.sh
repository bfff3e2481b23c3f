#!/usr/bin/env bash
# Several hosts (or several processes on one host): run this once per process, on every host.
# The coordinator (process 0's host:port) and the process layout come from the environment:
#   JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=<0..3> \
#     launch/multihost.sh configs/coco_pretrain.py /shared/workdirs/coco_pretrain
# The workdir must be on a filesystem every host sees (NFS, GCS via gcsfuse, Lustre...): each
# process writes its own data-iterator state; params and optimizer state are saved collectively.
# batch_size is global: each process loads batch_size / JAX_NUM_PROCESSES examples per step.
# DRY_RUN=1 prints this process's command instead of running it.
set -euo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
: "${JAX_COORDINATOR_ADDRESS:?set JAX_COORDINATOR_ADDRESS=host:port of process 0}"
: "${JAX_NUM_PROCESSES:?set JAX_NUM_PROCESSES}"
: "${JAX_PROCESS_ID:?set JAX_PROCESS_ID}"
read -r -a CMD <<< "${DMFUSE:-dmfuse}"
if [[ "${DRY_RUN:-0}" != 0 ]]; then
  echo "process $JAX_PROCESS_ID: JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS" \
    "JAX_NUM_PROCESSES=$JAX_NUM_PROCESSES JAX_PROCESS_ID=$JAX_PROCESS_ID" \
    "${CMD[*]} train --config $CONFIG --workdir $WORKDIR --distributed auto $*"
  exit 0
fi
exec "${CMD[@]}" train --config "$CONFIG" --workdir "$WORKDIR" --distributed auto "$@"
