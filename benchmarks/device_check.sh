#!/usr/bin/env bash
# The kernels' device session (issue 17) on an H200, one call of at most 9.5 minutes
# (run it with timeout_s 600):
#   1. the kernel tests on the real drivers (Mosaic GPU on Hopper, Triton), <= 150 s;
#   2. `attention.py --tune` (block sizes, warps, stages, ring depth at T 4k and 8k, both
#      masks), <= TUNE_S s, applied to this copy's flash.TUNED (and kept in /tmp for a later
#      call on the same warm machine) so that the benchmark runs the tuned kernels;
#   3. the benchmark (T 4k, 8k, 16k, 1k, 2k; causal and windowed; softmax and softplus;
#      fwd and fwd+bwd; ours with and without stats and with the Triton driver, cuDNN, XLA,
#      jax's Triton and Mosaic GPU flash), <= BENCH_S s, then the summary table (TFLOP/s as
#      a fraction of cuDNN's). Rows past the budget are recorded as skipped.
# Writes attention_tune.json, attention.json and logs to $OUT. Back home, put the measured
# configs into the repo: `python benchmarks/attention.py --apply-tune OUT/attention_tune.json`.
# STAGES (default "tests tune bench") picks stages: e.g. two calls, STAGES="tests tune"
# then STAGES=bench BENCH_S=540, give the benchmark more rows.
# Run from the repository root; ml_collections travels as a wheel in .whl/ (see README).
set -u
OUT=${OUT:-benchmarks/results}
STAGES=${STAGES:-tests tune bench}
TUNE_S=${TUNE_S:-160}
BENCH_S=${BENCH_S:-250}
SAVED_TUNE=/tmp/stability_attention_tune.json
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
$PY -c "import jax; d = jax.devices()[0]; print(jax.__version__, d, getattr(d, 'compute_capability', '-'))"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for stage in $STAGES; do
  case $stage in
    tests)
      echo "== kernel tests (compiled drivers)"
      timeout 150 $PY -m pytest tests/kernels -q -p no:cacheprovider --durations=10 2>&1 | tail -40 | tee "$OUT/kernel_tests.log"
      ;;
    tune)
      echo "== tune"
      timeout "$TUNE_S" $PY benchmarks/attention.py --tune --seq 4096,8192 --budget-s $((TUNE_S - 25)) \
        --out "$OUT/attention_tune.json" 2>&1 | tail -60 | tee "$OUT/attention_tune.log"
      cp "$OUT/attention_tune.json" "$SAVED_TUNE" || true
      ;;
    bench)
      echo "== attention benchmark"
      if [ -f "$SAVED_TUNE" ]; then $PY benchmarks/attention.py --apply-tune "$SAVED_TUNE" || true; fi
      timeout "$BENCH_S" $PY benchmarks/attention.py --seq 4096,8192,16384,1024,2048 --budget-s $((BENCH_S - 40)) \
        --out "$OUT/attention.json" 2>&1 | tail -150 | tee "$OUT/attention.log"
      ;;
    *)
      echo "unknown stage $stage (valid: tests tune bench)" >&2
      exit 2
      ;;
  esac
done
