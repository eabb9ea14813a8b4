"""Override presets shared by the sweep files (``sweeps/*.py``).

Every shipped sweep takes ARG ``PRESET[,steps=N]`` (``parse_arg``). ``ACCELERATOR`` is the
paper's setting (C4 with the T5 SentencePiece vocabulary, batch 256 × 512 tokens, 1e5 steps,
warmup 5e3, bf16); it needs ``data.tfds_data_dir`` and ``data.tokenizer_path`` on the command
line. ``CPU`` is laptop-sized on the embedded stdlib text.
"""

from stability.config import ConfigError, size_preset

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

# Sharding of the paper's width family on accelerators (bf16 compute, float32 master weights,
# batch 256 × 512): FSDP from w1536 on (parameters + Adam state ≥ 16 B × 0.25B params per
# run), block remat over scanned layers from w3072 on, full remat for w8192. Remat pays only
# with scanned layers (unrolled, XLA keeps what remat would free). XLA's per-device numbers
# on 8 simulated devices are in docs/sharding.md; `stability train --check` measures the
# program on the real mesh.
_SCANNED = {"train.fsdp": True, "train.scan_layers": True}
WIDTH_SHARDING: dict[str, dict] = {
    "w1536": {"train.fsdp": True},
    "w2048": {"train.fsdp": True},
    "w3072": {**_SCANNED, "train.remat": "block"},
    "w4096": {**_SCANNED, "train.remat": "block"},
    "w8192": {**_SCANNED, "train.remat": "full"},
}


def width(size: str) -> dict:
    """Overrides of one size of the width family (``config.SIZES``): its model shape plus
    the sharding of ``WIDTH_SHARDING``."""
    return {
        **{f"model.{k}": v for k, v in size_preset(size).items()},
        **WIDTH_SHARDING.get(size, {}),
    }


PRESETS = {"accelerator": ACCELERATOR, "cpu": CPU}


def default_preset() -> str:
    """ "cpu" on a host without an accelerator, else "accelerator"."""
    import jax

    return "cpu" if jax.default_backend() == "cpu" else "accelerator"


def parse_arg(
    arg: str, sweep: str, default: str | None = None, presets: dict | None = None
) -> tuple[str, dict]:
    """The ARG of every shipped sweep file, ``PRESET[,steps=N]``: (preset name, its overrides).

    PRESET is one of ``presets`` (default ``PRESETS``: "cpu" or "accelerator"; a sweep may
    adjust them). Without one, ``default``, else :func:`default_preset`, said in one line on
    stderr. ``steps=N`` sets train.steps to N and scales the preset's warmup, eval and
    checkpoint intervals with it. Anything else is a ConfigError of one line naming the sweep
    file and the valid ARGs.
    """
    presets = presets or PRESETS
    preset, *extras = arg.split(",") if arg else [""]
    if not preset:
        chosen = default or default_preset()
        if default is None:
            import sys

            why = "this host has no accelerator" if chosen == "cpu" else "this host has one"
            print(
                f"sweeps/{sweep}.py: no PRESET in its ARG: using {chosen!r} ({why}; "
                f"valid: {', '.join(presets)})",
                file=sys.stderr,
            )
        preset = chosen
    valid = f"valid: PRESET[,steps=N] with PRESET {' or '.join(presets)}"
    if preset not in presets:
        raise ConfigError(f"--sweep=sweeps/{sweep}.py:{arg}: unknown preset {preset!r}; {valid}")
    out = dict(presets[preset])
    for extra in extras:
        key, eq, value = extra.partition("=")
        if key != "steps" or not eq or not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--sweep=sweeps/{sweep}.py:{arg}: bad ARG part {extra!r}; {valid}")
        out = with_steps(out, int(value))
    return preset, out


def with_steps(overrides: dict, steps: int) -> dict:
    """``overrides`` with train.steps = ``steps`` and the warmup, eval and checkpoint intervals
    scaled by steps / the old train.steps (at least 1; warmup may be 0)."""
    scale = steps / overrides["train.steps"]
    out = {**overrides, "train.steps": steps}
    out["optim.warmup_steps"] = int(overrides["optim.warmup_steps"] * scale)
    for key in ("train.eval_every", "train.checkpoint_every"):
        out[key] = max(1, round(overrides[key] * scale))
    out["train.log_every"] = min(overrides["train.log_every"], steps)
    return out


def common(arg: str, sweep: str, default: str | None = None) -> dict:
    """The overrides named by a sweep file's ARG (``parse_arg``)."""
    return parse_arg(arg, sweep, default)[1]
