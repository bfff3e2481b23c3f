#!/usr/bin/env bash
# One host, all its accelerators (or its CPU): one process, a mesh over every local device.
#   launch/single_host.sh configs/coco_pretrain.py workdirs/coco_pretrain [--config.key=value ...]
# Re-running the same command resumes from the workdir's latest checkpoint.
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
read -r -a CMD <<< "${DMFUSE:-dmfuse}"
if [[ "${DRY_RUN:-0}" != 0 ]]; then
  echo "process 0: ${CMD[*]} train --config $CONFIG --workdir $WORKDIR $*"
  exit 0
fi
exec "${CMD[@]}" train --config "$CONFIG" --workdir "$WORKDIR" "$@"
