#!/usr/bin/env bash
# One prepared accelerator session (about 11 minutes on an H200): the kernel tests on the real
# Triton driver, then the attention, train-step and sweep benchmarks. Writes JSON/logs to $OUT.
# Run from the repository root; ml_collections travels as a wheel in .whl/ (see README).
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
python3 -c "import jax; print(jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
echo "== kernel tests (Triton driver on the GPU)"
timeout 150 python3 -m pytest tests/kernels -q -x -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/kernel_tests.log"
echo "== attention benchmark"
timeout 240 python3 benchmarks/attention.py --budget-s 190 --out "$OUT/attention.json" 2>&1 | tail -40 | tee "$OUT/attention.log"
echo "== train-step benchmark"
timeout 60 python3 benchmarks/train_step.py --out "$OUT/train_step.json" 2>&1 | tail -5 | tee "$OUT/train_step.log"
echo "== sweep benchmark"
timeout 300 python3 benchmarks/sweep.py --skip-naive --steps 300 --sizes 64,128,256 --out "$OUT/sweep.json" 2>&1 | tail -12 | tee "$OUT/sweep.log"
