"""The held-out sweep of the early-warning evaluation (benchmarks/early_warning.py): other data
than the sweeps the detectors were tuned on (the stdlib bytes of `sweeps/sizes.py`). A
generated Zipf–Markov language (vocabulary 256, 16 successors per state), qk-layernorm off/on ×
three sizes of the sizes family (d=16·L=1, d=32·L=2, d=48·L=3) × the paper's LR grid, 200 steps,
warm-up 5%. Run it with other seeds than the tuning sweep's (the benchmark uses
--seeds=3 --seed-offset=100). ARG: cpu (the only preset)."""

from stability.config import ConfigError
from stability.presets import PAPER_LRS

NAME = "heldout_markov"
PRESETS = ("cpu",)  # a benchmark of CPU-scale runs
SIZES = ((16, 1, 2), (32, 2, 4), (48, 3, 6))


def get_sweep(arg: str = "cpu"):
    if arg not in ("", *PRESETS):
        raise ConfigError(f"--sweep=sweeps/{NAME}.py:{arg}: the only preset is cpu")
    base = {
        "data.source": "synthetic_markov",
        "data.markov_vocab": 256,
        "data.markov_branching": 16,
        "data.seq_len": 64,
        "data.batch_size": 16,
        "train.steps": 200,
        "optim.warmup_steps": 10,
        "train.eval_every": 200,
        "train.checkpoint_every": 100,
        "train.log_every": 10,
    }
    return [
        {
            **base,
            "model.d_model": d,
            "model.n_layers": layers,
            "model.n_heads": heads,
            "model.qk_norm": qk,
            "optim.lr": lr,
        }
        for qk in (False, True)
        for d, layers, heads in SIZES
        for lr in PAPER_LRS
    ]
