#!/usr/bin/env bash
# One host, all its accelerators (or its CPU): one process, a mesh over every local device.
#   launch/single_host.sh configs/coco_pretrain.py workdirs/coco_pretrain [--config.key=value ...]
# Re-running the same command resumes from the workdir's latest checkpoint.
set -euo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
exec dmfuse train --config "$CONFIG" --workdir "$WORKDIR" "$@"
