#!/usr/bin/env bash
# Cloud TPU VM (e.g. a v5e-16 slice = 4 hosts): the same command on every host of the slice.
# On TPU VMs JAX finds the coordinator and the process layout itself (--distributed on).
#   launch/tpu_vm.sh my-tpu us-central2-b configs/coco_pretrain.py /mnt/gcs/workdirs/coco
# First install the package on every worker, e.g.:
#   gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b --worker=all \
#     --command='pip install "jax[tpu]" && pip install -e ~/dmfuse-jax'
# The workdir must be a local path visible to every host: e.g. a gcsfuse mount of a bucket or NFS.
# Spot / preemptible TPUs: the preemption notice reaches every host through JAX's coordination
# service; the run saves a checkpoint at the same step on all hosts; re-run this script to resume.
# DRY_RUN=1 prints the gcloud command and the command every worker runs, without calling gcloud.
set -euo pipefail
TPU=${1:?TPU name}; ZONE=${2:?zone}; CONFIG=${3:?config file}; WORKDIR=${4:?workdir}; shift 4
REMOTE="cd ~/dmfuse-jax && ${DMFUSE:-dmfuse} train --config $CONFIG --workdir $WORKDIR --distributed on \
--config.data.worker_count=8 $*"
GCLOUD=(gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$REMOTE")
if [[ "${DRY_RUN:-0}" != 0 ]]; then
  echo "${GCLOUD[*]:0:8} --command='$REMOTE'"
  echo "every worker of $TPU: $REMOTE"
  exit 0
fi
"${GCLOUD[@]}"
