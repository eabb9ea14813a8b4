#!/usr/bin/env bash
# Run a sweep on every host of a TPU pod slice (WORKDIR on a filesystem all hosts share):
# each host runs the same command and
# jax.distributed (--distributed) connects them; the run axis is sharded over all chips and
# each host reads only its rows of every batch. The compilation cache goes beside WORKDIR
# (shared: one host's compile serves every host and every rerun).
#   sweeps/launch_tpu_pod.sh TPU_NAME ZONE SWEEP WORKDIR [--config.KEY=VALUE ...]
# e.g. sweeps/launch_tpu_pod.sh my-v4-32 us-central2-b sweeps/qk_norm.py /mnt/shared/runs/qk \
#        --config.data.tfds_data_dir=gs://bucket/tfds --config.data.tokenizer_path=/data/t5.model
set -euo pipefail
TPU=$1 ZONE=$2 SWEEP=$3 WORKDIR=$4
shift 4
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="\
  cd ~/stability && (test -x .venv/bin/stability || (python3 -m venv .venv && .venv/bin/pip install -q -c requirements/lock.txt -e '.[data]' && .venv/bin/pip install -q -e '.[tpu]')) && \
  WANDB_MODE=\${WANDB_MODE:-offline} .venv/bin/stability sweep --sweep=$SWEEP --workdir=$WORKDIR \
  --strategy=vmap --distributed --no-progress --compilation-cache=$WORKDIR/../jax_cache $*"
