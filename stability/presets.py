"""Override presets shared by the sweep files (``sweeps/*.py``).

``ACCELERATOR`` is the paper's setting (C4 with the T5 SentencePiece vocabulary, batch 256 ×
512 tokens, 1e5 steps, warmup 5e3, bf16); it needs ``data.tfds_data_dir`` and
``data.tokenizer_path`` on the command line. ``CPU`` is laptop-sized on the embedded stdlib text.
"""

from stability.config import ConfigError

PAPER_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)

ACCELERATOR = {
    "data.source": "tfds",
    "data.tfds_name": "c4/en:3.1.0",
    "data.tokenizer": "sentencepiece",
    "model.vocab_size": 32128,
    "data.seq_len": 512,
    "data.batch_size": 256,
    "train.steps": 100_000,
    "optim.warmup_steps": 5_000,
    "train.eval_every": 5_000,
    "train.checkpoint_every": 5_000,
    "train.log_every": 100,
    "model.dtype": "bfloat16",
    "model.d_model": 512,
    "model.n_layers": 6,
    "model.n_heads": 8,
}

CPU = {
    "model.d_model": 128,
    "model.n_layers": 2,
    "model.n_heads": 4,
    "train.steps": 500,
    "optim.warmup_steps": 50,
    "train.eval_every": 500,
    "train.checkpoint_every": 250,
    "train.log_every": 10,
}


def common(arg: str, sweep: str) -> dict:
    """The preset named by a sweep file's ARG: "" (accelerator) or "cpu"."""
    if arg == "":
        return dict(ACCELERATOR)
    if arg == "cpu":
        return dict(CPU)
    raise ConfigError(
        f"--sweep=sweeps/{sweep}.py:{arg}: unknown ARG; valid: '' (accelerator) or 'cpu'"
    )
