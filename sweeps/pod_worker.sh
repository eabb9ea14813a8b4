#!/usr/bin/env bash
# What every host of a TPU pod slice runs (sweeps/launch_tpu_pod.sh starts it on all workers):
#   sweeps/pod_worker.sh SWEEP WORKDIR [--config.KEY=VALUE ...]
# From the repository this script lives in, wherever it is cloned: installs .venv from the lock
# (requirements/lock.txt constrains every package it lists, jax included; the tpu extra adds
# libtpu and gcsfs) unless .venv exists, then runs the sweep on every host with
# jax.distributed (--distributed: the TPU runtime, or SLURM, tells each process its rank). The
# workdir and the data may be local paths that every host shares or gs:// paths. The
# compilation cache is $STABILITY_COMPILATION_CACHE, else beside WORKDIR (shared: one host's
# compile serves every host and every rerun). The project needs Python >= 3.11: set PYTHON to
# one (e.g. PYTHON=python3.11) where the host's python3 is older.
set -euo pipefail
SWEEP=$1 WORKDIR=$2
shift 2
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "pod_worker.sh: $PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'), the project needs >= 3.11; set PYTHON=python3.11 (or newer)" >&2
  exit 2
fi
if ! test -x .venv/bin/stability; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c requirements/lock.txt -e '.[data,tpu]' --config-settings editable_mode=compat
fi
CACHE=${STABILITY_COMPILATION_CACHE:-${WORKDIR%/}_jax_cache}
WANDB_MODE=${WANDB_MODE:-offline} exec .venv/bin/stability sweep --sweep="$SWEEP" \
  --workdir="$WORKDIR" --strategy=vmap --distributed --no-progress --compilation-cache="$CACHE" "$@"
