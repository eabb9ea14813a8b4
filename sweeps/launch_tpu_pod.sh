#!/usr/bin/env bash
# Run a sweep on every host of a TPU pod slice: each worker runs sweeps/pod_worker.sh (install
# from the lock if needed, then the sweep under jax.distributed) in its clone of this
# repository, at $REPO (relative to the worker's home directory; default: stability).
#   sweeps/launch_tpu_pod.sh TPU_NAME ZONE SWEEP WORKDIR [--config.KEY=VALUE ...]
# e.g. sweeps/launch_tpu_pod.sh my-v5e-256 us-west4-a sweeps/qk_norm.py gs://bucket/runs/qk \
#        --config.data.tfds_data_dir=gs://bucket/tfds --config.data.tokenizer_path=gs://bucket/t5.model
# A preemption (SIGTERM on any one host) stops every host at the same step with one
# checkpoint; run the same command again to resume.
set -euo pipefail
TPU=$1 ZONE=$2 SWEEP=$3 WORKDIR=$4
shift 4
REPO=${REPO:-stability}
args=$(printf ' %q' "$SWEEP" "$WORKDIR" "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all \
  --command="cd $REPO && WANDB_MODE=\${WANDB_MODE:-offline} sweeps/pod_worker.sh$args"
