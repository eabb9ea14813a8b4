"""Typed, frozen configuration: the code takes these dataclasses, never raw dicts.

Experiment files (``configs/*.py``) return an ``ml_collections.ConfigDict`` whose
structure mirrors :class:`Config`; :func:`from_config_dict` converts it and is the one
place where validation happens. Every error is a :class:`ConfigError` naming the field,
the bad value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

import ml_collections


class ConfigError(ValueError):
    """An invalid configuration value. ``str(err)`` is one line naming the field."""


Norm = Literal["layernorm", "rmsnorm", "powernorm"]
LinearKind = Literal["plain", "sigma_reparam"]
GammaInit = Literal["sigma", "one"]
ScoreKind = Literal["softmax", "softplus", "relu"]
AttentionImpl = Literal["xla", "pallas"]
DType = Literal["float32", "bfloat16"]
Source = Literal["stdlib", "text_files", "synthetic_markov", "bigram_backcopy", "tfds"]
Tokenizer = Literal["bytes", "sentencepiece"]
WandbMode = Literal["offline", "online", "disabled"]
Remat = Literal["none", "block", "full"]
Schedule = Literal["cosine", "linear", "constant", "rsqrt", "wsd", "wsd_s"]
DecayShape = Literal["linear", "cosine", "sqrt", "exponential"]
WeightDecayMode = Literal["independent", "coupled"]
Optimizer = Literal["adamw", "spam", "lion", "adafactor", "sgd"]
Parametrization = Literal["standard", "mup_simple", "mup_hidden", "mup_full"]


Needs = tuple[Callable[["Config"], bool], str]  # (is the setting on?, the setting in words)


def declare(
    default: Any, *, per_run: bool = False, needs: Needs | None = None, since: str | None = None
) -> Any:
    """A config field with what the package derives from it, declared beside it.

    per_run: a sweep may vary it between the runs of one compiled program (a traced scalar of
    the step, ``step.hyperparams``); declaring it is all a new one needs besides the code that
    reads ``hp[name]``. needs: the field acts only under that setting; set otherwise, it is
    refused, naming both (``_refuse_unused``). since: the release that added it; left out of
    a config's identity while at its default, so earlier workdirs keep their run ids."""
    metadata = {k: v for k, v in (("per_run", per_run), ("needs", needs), ("since", since)) if v}
    return field(default=default, metadata=metadata)


def per_run(default: Any) -> Any:
    """``declare(default, per_run=True)``."""
    return declare(default, per_run=True)


def _optim(*names: str) -> Needs:
    return (lambda c: c.optim.name in names, f"optim.name in {names}")


def _source(*names: str) -> Needs:
    words = " or ".join(repr(n) for n in names)
    return (lambda c: c.data.source in names, f"data.source={words}")


_REPARAM: Needs = (lambda c: c.model.linear == "sigma_reparam", "model.linear='sigma_reparam'")
_WSD: Needs = (lambda c: c.optim.schedule in ("wsd", "wsd_s"), "optim.schedule='wsd' or 'wsd_s'")


def per_run_fields() -> list[tuple[str, str]]:
    """(section, field) of every per-run hyperparameter, in declaration order."""
    return [(section, f.name) for section, f in _fields() if f.metadata.get("per_run")]


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer; defaults are the recipe of Wortsman et al. 2023."""

    vocab_size: int = 256  # tokens; 256 for byte-level text
    d_model: int = 128  # residual width
    n_layers: int = 2
    n_heads: int = 4  # head dim = d_model / n_heads
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model (gelu)
    norm: Norm = "layernorm"  # pre-norm kind in every block and before the head
    # layernorm, rmsnorm (powernorm uses its reference's 1e-5)
    norm_eps: float = declare(
        1e-6,
        needs=(
            lambda c: c.model.norm != "powernorm" or c.model.qk_norm,
            "model.norm='layernorm' or 'rmsnorm', or model.qk_norm=True",
        ),
    )
    # PowerNorm (Shen et al. 2020): steps that normalise by the batch statistic, as the
    # reference does (10,000 there); 0 = the running statistic φ from past steps only. A
    # warmup mixes future tokens into the forward pass of a causal LM.
    powernorm_warmup: int = declare(
        0, needs=(lambda c: c.model.norm == "powernorm", "model.norm='powernorm'")
    )
    qk_norm: bool = True  # per-head LayerNorm (scale only) on q and k before the dot product
    # σReparam (Zhai et al. 2023) on q, k, v, output projection and both MLP layers:
    # W ← (γ/σ(W))·W, σ by one power-iteration step per training step.
    linear: LinearKind = "plain"
    # σReparam on the output head too (needs an untied head)
    sigma_reparam_head: bool = declare(False, needs=_REPARAM)
    # γ₀ = σ(W₀) (Ŵ = W at init) or 1
    sigma_reparam_gamma_init: GammaInit = declare("sigma", needs=_REPARAM)
    # Attention weights: softmax(q·k/√H); "softplus": LSSA of Gao et al. 2025 (ℓ2-normalised
    # q, k, logit scale log(H)·log(N_i), softplus over Σ softplus); "relu": ReLU(q·k/√H)/N_i,
    # unnormalised (Guo et al. 2024). N_i = keys query i sees.
    attention_score: ScoreKind = "softmax"
    # LSSAR: weights ∝ ReLU(N_i·A − o_i)^p (softplus only)
    softplus_reweight: bool = declare(
        False,
        needs=(lambda c: c.model.attention_score == "softplus", "model.attention_score='softplus'"),
    )
    # p of the re-weighting; >= 1
    softplus_reweight_power: float = declare(
        15.0, needs=(lambda c: c.model.softplus_reweight, "model.softplus_reweight=True")
    )
    # LS-attention (Hajra 2025): the first n_local_heads heads see only the local_window most
    # recent tokens (the query included); the other heads are global (full causal).
    n_local_heads: int = 0
    # the local heads' window, in tokens
    local_window: int = declare(
        16, needs=(lambda c: c.model.n_local_heads > 0, "model.n_local_heads > 0")
    )
    attn_softcap: float = 0.0  # c > 0: attention logits ← c·tanh(logits/c) (Gemma 2: 50); 0 = off
    logit_multiplier: float = (
        1.0  # output logits ← m·logits; μParam (full): optim.mup_base_d_model/d_model
    )
    logit_softcap: float = 0.0  # c > 0: output logits ← c·tanh(logits/c) (Gemma 2: 30); 0 = off
    # λ of the sink decorrelation loss: λ·mean over the residual states between blocks of
    # mean over positions s >= 1 of cos²(h_0, h_s) (AVSR attention sinks, 2025). 0 = off.
    sink_decorrelation: float = 0.0
    tie_embeddings: bool = False  # output head = input embedding transposed
    rope_base: float = 10_000.0  # rotary position embedding base
    attention_impl: AttentionImpl = "xla"  # "pallas": flash kernels with in-kernel stats
    dtype: DType = "float32"  # compute dtype (params stay float32)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer, per-layer LR parametrization and LR schedule. Defaults: the paper's recipe
    (AdamW, independent weight decay, linear warmup then cosine decay). See
    ``stability/optim/build.py`` for the update rules and ``schedules.py`` for the schedules."""

    # adamw: Adam + decay. spam: SPAM (Huang et al. 2025), Adam with spike clipping and
    # periodic momentum resets. lion: sign of interpolated momentum (Chen et al. 2023; wants a
    # 3-10x smaller lr and larger λ than AdamW). adafactor: factored second moment (Shazeer &
    # Stern 2018), update clipping, absolute LR (no parameter-scale step). sgd: heavy-ball SGD.
    name: Optimizer = "adamw"
    lr: float = per_run(1e-2)  # peak learning rate
    # β1: first-moment decay of adamw/spam/adafactor (0 = none, the original Adafactor) and
    # Lion's update interpolation. β2: second-moment decay of adamw/spam; Lion's momentum decay
    # (Lion's reference: β1 0.9, β2 0.99). SPAM shares b1/b2/eps with adamw; its reference
    # defaults are β2 = 0.999, ε = 1e-6.
    b1: float = declare(0.9, needs=_optim("adamw", "spam", "lion", "adafactor"))
    b2: float = declare(0.95, needs=_optim("adamw", "spam", "lion"))
    # adamw/spam: ε added to √v (gradient units); 1e-15 … 1e-6 work
    eps: float = declare(1e-8, per_run=True, needs=_optim("adamw", "spam"))
    # sgd: heavy-ball momentum in [0, 1); 0 = plain SGD
    momentum: float = declare(0.9, needs=_optim("sgd"))
    weight_decay: float = per_run(1e-4)  # λ, per update (see weight_decay_mode)
    # independent: θ ← θ − η_t·Δ − (η_t/η)·λ·θ; coupled: θ ← θ − η_t·(Δ + λ·θ); Δ is the
    # optimizer's direction (times the μParam multiplier). Only params with ndim >= 2 decay.
    weight_decay_mode: WeightDecayMode = "independent"
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    # SPAM (name="spam"): spike threshold θ (|g| > √θ·√v is clipped), updates ΔT between
    # momentum resets (> 20), updates N of cosine step warm-up after each reset, and the
    # sparse-momentum density in (0, 1] (1 = dense, the usual SPAM).
    spam_threshold: float = declare(5000.0, needs=_optim("spam"))
    spam_reset_interval: int = declare(500, needs=_optim("spam"))
    spam_reset_warmup: int = declare(150, needs=_optim("spam"))
    spam_density: float = declare(1.0, needs=_optim("spam"))
    # Adafactor (name="adafactor"): β2_t = 1 − t^(−decay_rate); update clipping d (per-param
    # RMS of the direction clipped to d; 0 = off); second moments of matrices are factored
    # when both of their two largest dims are >= adafactor_min_dim_to_factor.
    adafactor_decay_rate: float = declare(0.8, needs=_optim("adafactor"))
    adafactor_clip: float = declare(1.0, needs=_optim("adafactor"))
    adafactor_min_dim_to_factor: int = declare(128, needs=_optim("adafactor"))
    # μParam (Yang et al. 2022; Wortsman et al. 2023 §3.2.4), optim/build.py: "mup_simple" is
    # the paper's μParam (simple): the LR of every linear layer (blocks' q/k/v/o, fc1, fc2
    # kernels and the head) × base_fan_in/fan_in = mup_base_d_model/d_model; "mup_hidden": the
    # hidden matrices only (release 0.2.0's "mup_simple"); "mup_full": mup_hidden and the
    # output logits × the same factor (model side). Embedding and norm scales keep the LR.
    parametrization: Parametrization = "standard"
    # width of the base model whose LR is tuned
    mup_base_d_model: int = declare(
        128,
        needs=(
            lambda c: c.optim.parametrization != "standard",
            "optim.parametrization other than 'standard'",
        ),
    )
    # cosine/linear/constant/rsqrt: warmup then decay over the rest of training. wsd: warmup,
    # stable at the peak, then a decay over the last decay_fraction of training. wsd_s (Wen et
    # al. 2024): cycles of stable then decay (the last decay_fraction of each cycle), jumping
    # back to the peak after each decay; cycle ends are wsd_decay_ends plus train.steps, or
    # wsd_cycles equal cycles.
    schedule: Schedule = "cosine"
    warmup_steps: int = per_run(100)
    # absolute LR at the end of the decay
    min_lr: float = declare(
        1e-5,
        needs=(lambda c: c.optim.schedule != "constant", "optim.schedule other than 'constant'"),
    )
    # wsd/wsd_s decay: linear, cosine, 1−√p, exponential
    decay_shape: DecayShape = declare("linear", needs=_WSD)
    # wsd/wsd_s: fraction of training (of each cycle) that decays
    decay_fraction: float = declare(0.1, needs=_WSD)
    wsd_cycles: int = 1  # wsd_s: number of equal cycles (when wsd_decay_ends is empty)
    wsd_decay_ends: tuple[int, ...] = ()  # wsd_s: updates after which a decay ends, increasing


@dataclass(frozen=True)
class DataConfig:
    """Where token batches come from. Batches are a pure function of (seed, step)."""

    source: Source = "stdlib"  # stdlib: the Python standard library's own .py files, as bytes
    seed: int = 0  # data order; every run of a sweep with the same data.seed sees the same batches
    # text_files: files or directories (searched recursively)
    paths: tuple[str, ...] = declare((), needs=_source("text_files"))
    # globs for directories in `paths`
    include: tuple[str, ...] = declare(("*.py", "*.txt", "*.md"), needs=_source("text_files"))
    seq_len: int = 64  # tokens per sequence
    batch_size: int = 16  # sequences per step
    # held-out tail of the text stream for eval/loss
    eval_fraction: float = declare(0.05, needs=_source("stdlib", "text_files"))
    # synthetic_markov: vocabulary size
    markov_vocab: int = declare(256, needs=_source("synthetic_markov"))
    # synthetic_markov: Zipf exponent of each transition row
    markov_zipf: float = declare(1.1, needs=_source("synthetic_markov"))
    # synthetic_markov: successors per state
    markov_branching: int = declare(32, needs=_source("synthetic_markov"))
    # bigram_backcopy: Markov symbols; BOS is token backcopy_vocab
    backcopy_vocab: int = declare(64, needs=_source("bigram_backcopy"))
    # bigram_backcopy: the k most frequent symbols, after which the next token copies the one before the trigger
    backcopy_triggers: int = declare(3, needs=_source("bigram_backcopy"))
    # tfds: dataset name with optional config/version, e.g. "lm1b", "c4/en:3.1.0"
    tfds_name: str = declare("", needs=_source("tfds"))
    # tfds: directory (or bucket) where the dataset is prepared as array_record
    tfds_data_dir: str = declare("", needs=_source("tfds"))
    # tfds: training split (tfds split syntax, e.g. "train[:90%]")
    tfds_split: str = declare("train", needs=_source("tfds"))
    # tfds: held-out split for eval/loss and bits per byte
    tfds_eval_split: str = declare("validation", needs=_source("tfds"))
    # tfds: feature holding each document's text
    tfds_text_feature: str = declare("text", needs=_source("tfds"))
    # tfds: "bytes" (258 ids: bytes, BOS 256, EOS 257) or "sentencepiece"
    tokenizer: Tokenizer = declare("bytes", needs=_source("tfds"))
    # sentencepiece: path of the .model file (e.g. the T5 vocabulary, 32,100 pieces)
    tokenizer_path: str = declare(
        "", needs=(lambda c: c.data.tokenizer == "sentencepiece", "data.tokenizer='sentencepiece'")
    )


@dataclass(frozen=True)
class WandbConfig:
    # offline writes <workdir>/wandb ($WANDB_DIR/wandb if set) for `wandb sync`; the
    # environment's WANDB_MODE wins over this field
    mode: WandbMode = "offline"
    project: str = "stability"
    group: str = ""
    tags: tuple[str, ...] = ()
    name: str = ""  # defaults to the workdir name


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 800
    seed: int = 0  # parameter initialisation (data order: data.seed)
    z_loss: float = per_run(1e-4)  # weight on mean(log Z²) of the output logits
    log_every: int = 10  # steps between metric records
    eval_every: int = 200  # steps between eval/loss; the last step always evaluates
    eval_batches: int = 4
    checkpoint_every: int = 200  # steps between orbax checkpoints; the last step always saves
    max_to_keep: int = 2
    divergence_loss: float = 1e3  # a finite loss above this also counts as divergence
    # Updates per device call (a lax.scan inside the jitted program); 0 = as many as the next
    # log / eval / checkpoint / decay-end boundary allows.
    steps_per_call: int = 0
    # Sharding of one run (stability/sharding.py): the mesh is ("run", "data", "model").
    # fsdp: also shard parameters, gradients and optimizer state over "data" (ZeRO-3/FSDP).
    fsdp: bool = False
    tensor_parallel: int = 1  # size of the "model" axis: heads and MLP hidden split over it
    # Activation rematerialisation in the backward pass (models/transformer.py): none; block =
    # recompute each block but keep its weight-matmul outputs (norms, attention weights, gelu
    # recomputed); full = keep nothing inside a block but its input.
    remat: Remat = "none"
    # Run the blocks as one lax.scan (models/transformer.py) over their variables stored
    # stacked (a leading "layers" axis) instead of an unrolled loop: remat then frees memory,
    # and compile time hardly grows with depth (docs/sharding.md). Losses and metrics (names
    # included) are the same either way; a single run's checkpoint converts when it changes.
    scan_layers: bool = declare(False, since="0.2.0")
    # A sweep deletes a chunk's checkpoints once every run of it has its results record (a
    # rerun skips finished runs); True keeps its final checkpoint. A single run keeps its own.
    keep_final_checkpoint: bool = declare(False, since="0.3.0")


# Early warning (stability/watch.py: each detector's formula). Detectors read the records
# already logged; they cost no device work.
OnWarning = Literal["log", "checkpoint", "stop"]


@dataclass(frozen=True)
class LogitWatch:
    """Max attention logit growing towards ``threshold`` (watch.LogitGrowth)."""

    enabled: bool = True
    threshold: float = 1e4  # the paper's: every run whose max logit passed it diverged
    window: int = 8  # trailing logged steps of the log-linear fit
    horizon: int = 0  # warn for a crossing within this many steps; 0 = before the end
    min_logit: float = 30.0  # no warning below this logit (stable runs stay under it)
    confirm: int = 1  # warn once the condition has held at this many consecutive logged steps


@dataclass(frozen=True)
class EntropyWatch:
    """Attention entropy collapse (watch.EntropyCollapse)."""

    enabled: bool = True
    floor: float = 0.05  # nats: the lowest head's mean row entropy below this
    drop: float = 0.9  # or below (1 - drop) x its largest value over the first `window`
    window: int = 5  # logged steps that define the early value


@dataclass(frozen=True)
class LogZWatch:
    """Output-logit drift: mean log Z trending below ``bound`` (watch.LogZDrift)."""

    enabled: bool = True
    bound: float = -20.0  # nats
    window: int = 8  # trailing logged steps of the linear fit
    horizon: int = 0  # extrapolate this many steps ahead; 0 = to the end of training


@dataclass(frozen=True)
class EpsWatch:
    """Gradient RMS / Adam's ε below ``ratio`` for a parameter (watch.UpdatesVsEps)."""

    enabled: bool = True
    ratio: float = 1.0
    window: int = 5  # logged steps of the running median


@dataclass(frozen=True)
class LossSpikeWatch:
    """The common baseline: loss k standard deviations above its running mean
    (watch.LossSpike)."""

    enabled: bool = True
    k: float = 3.0
    window: int = 20  # previous logged steps of the running mean and deviation


@dataclass(frozen=True)
class WatchConfig:
    # What a warning does: log (console line, events.jsonl, W&B alert); checkpoint (also
    # keeps the checkpoint before the warning from rotation); stop (also freezes the run at
    # the next call boundary, as a diverged run is frozen, and records it as stopped)
    on_warning: OnWarning = "log"
    logit: LogitWatch = field(default_factory=LogitWatch)
    entropy: EntropyWatch = field(default_factory=EntropyWatch)
    log_z: LogZWatch = field(default_factory=LogZWatch)
    eps: EpsWatch = field(default_factory=EpsWatch)
    loss_spike: LossSpikeWatch = field(default_factory=LossSpikeWatch)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    watch: WatchConfig = field(default_factory=WatchConfig, metadata={"since": "0.2.0"})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Size presets. CPU sizes are what this project trains on a laptop; the "w*" family is the
# paper's width-scaling family (6 layers, head dim 64, heads scaled with width).
SIZES: dict[str, dict[str, int]] = {
    "xs": dict(d_model=64, n_layers=2, n_heads=2),
    "s": dict(d_model=128, n_layers=2, n_heads=4),
    "m": dict(d_model=256, n_layers=4, n_heads=4),
    # CPU width-scaling family (`stability forecast`, `reproduce --preset=cpu`): 2 layers,
    # head dim 16; non-embedding parameters 6.3K (c16) … 222K (c96), a 35× span.
    **{f"c{d}": dict(d_model=d, n_layers=2, n_heads=d // 16) for d in (16, 32, 48, 64, 96)},
    **{
        f"w{d}": dict(d_model=d, n_layers=6, n_heads=d // 64)
        for d in (256, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192)
    },
}


def size_preset(name: str) -> dict[str, int]:
    if name not in SIZES:
        raise ConfigError(f"model size preset {name!r} is unknown; valid: {', '.join(SIZES)}")
    return dict(SIZES[name])


# ---------------------------------------------------------------------------------------
# Conversion from / to ml_collections.


def default_config_dict() -> ml_collections.ConfigDict:
    """The default configuration as a ConfigDict (what `configs/default.py` returns)."""
    return to_config_dict(Config())


def to_config_dict(cfg: Config) -> ml_collections.ConfigDict:
    def conv(v):
        if isinstance(v, dict):
            return ml_collections.ConfigDict({k: conv(x) for k, x in v.items()})
        return v

    return conv(cfg.to_dict())


def _check_type(path: str, value: Any, tp: Any) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise a ConfigError naming ``path``."""
    origin = get_origin(tp)
    if origin is Literal:
        valid = get_args(tp)
        if value not in valid:
            raise ConfigError(
                f"{path}={value!r} is not valid; valid: {', '.join(map(repr, valid))}"
            )
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = (value,) if value else ()
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} must be a list of strings")
        return tuple(_check_type(f"{path}[{i}]", v, get_args(tp)[0]) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be True or False")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and abs(value) < 2**62:
                return int(value)
            raise ConfigError(f"{path}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r} must be a number")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{path}={value!r} must be a finite number")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} must be a string")
        return value
    raise TypeError(f"unhandled annotation {tp} for {path}")


def _build(cls: type, data: Any, path: str):
    if not isinstance(data, (dict, ml_collections.ConfigDict)):
        raise ConfigError(f"{path} must be a group of fields, got {data!r}")
    data = dict(data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"{path}.{unknown[0]} is not a known field; valid fields of {path}: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        sub = f"{path}.{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], sub)
        else:
            kwargs[name] = _check_type(sub, data[name], tp)
    return cls(**kwargs)


def typed_config(cd: ml_collections.ConfigDict | dict) -> Config:
    """Convert, checking structure and types only (no cross-field validation)."""
    return _build(Config, cd, "config")


def _fields() -> list[tuple[str, dataclasses.Field]]:
    """(section, field) of every field of every section, in declaration order."""
    return [
        (f.name, g)
        for f in dataclasses.fields(Config)
        for g in dataclasses.fields(f.default_factory)
    ]


def new_fields() -> list[str]:
    """Sections and fields that earlier releases did not have (declared with ``since``): left
    out of a config's identity while at their defaults, so the run ids and workdir checks of
    earlier workdirs stay what they were."""
    sections = [f.name for f in dataclasses.fields(Config) if "since" in f.metadata]
    return sections + [f"{s}.{f.name}" for s, f in _fields() if "since" in f.metadata]


def identity(cfg: Config) -> dict[str, Any]:
    """The config as a JSON-able dict for run ids and workdir comparisons: every field,
    except those of ``new_fields()`` while they are at their defaults, and the early-warning
    detectors' settings (``watch.*`` but ``on_warning``), which read the records and never
    change what a run computes."""
    out = _jsonable(cfg.to_dict())
    out["watch"] = {"on_warning": out["watch"]["on_warning"]}
    default = _jsonable(Config().to_dict())
    default["watch"] = {"on_warning": default["watch"]["on_warning"]}
    for name in new_fields():
        *parents, leaf = name.split(".")
        node, ref = out, default
        for part in parents:
            node, ref = node[part], ref[part]
        if node[leaf] == ref[leaf]:
            del node[leaf]
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def from_config_dict(
    cd: ml_collections.ConfigDict | dict, explicit: frozenset[str] | set[str] = frozenset()
) -> Config:
    """Convert and validate. Raises ConfigError (one line) on the first invalid field.
    ``explicit``: dotted keys the user set (command line, sweep points): a field that does
    nothing under the other settings is refused when set, even to its default."""
    cfg = typed_config(cd)
    validate(cfg, explicit)
    return cfg


def _positive(path: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{path}={value!r} must be > 0")


def validate(cfg: Config, explicit: frozenset[str] | set[str] = frozenset()) -> None:
    """Every check, section by section; raises ConfigError naming the first invalid field.
    ``explicit``: the keys the user set (see :func:`from_config_dict`)."""
    _validate_signs(cfg)
    _validate_model(cfg.model, cfg.optim)
    _validate_train(cfg.train, cfg.model, cfg.optim)
    _validate_optim(cfg.optim, cfg.train)
    _validate_data(cfg.data, cfg.model)
    _validate_watch(cfg.watch)
    _refuse_unused(cfg, explicit)


def _validate_watch(w: WatchConfig) -> None:
    for name in ("logit", "entropy", "log_z", "eps", "loss_spike"):
        group = getattr(w, name)
        for f in dataclasses.fields(group):
            v, path = getattr(group, f.name), f"config.watch.{name}.{f.name}"
            if (
                f.name in ("window", "threshold", "ratio", "k", "min_logit", "confirm")
                and not v > 0
            ):
                raise ConfigError(f"{path}={v!r} must be > 0")
            if f.name in ("horizon", "floor") and v < 0:
                raise ConfigError(f"{path}={v!r} must be >= 0")
    if not 0 < w.entropy.drop < 1:
        raise ConfigError(f"config.watch.entropy.drop={w.entropy.drop!r} must be in (0, 1)")


def _validate_signs(cfg: Config) -> None:
    """No numeric field means anything when negative, whether or not its feature is on."""
    for section in ("model", "optim", "data", "train"):
        group = getattr(cfg, section)
        for f in dataclasses.fields(group):
            v = getattr(group, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                raise ConfigError(f"config.{section}.{f.name}={v!r} must be >= 0")


def _validate_model(m: ModelConfig, o: OptimConfig) -> None:
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_ratio"):
        _positive(f"config.model.{name}", getattr(m, name))
    if m.d_model % m.n_heads:
        raise ConfigError(
            f"config.model.d_model={m.d_model} must be divisible by "
            f"config.model.n_heads={m.n_heads}"
        )
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(
            f"config.model.d_model/n_heads={m.d_model // m.n_heads} must be even (RoPE rotates pairs)"
        )
    _positive("config.model.norm_eps", m.norm_eps)
    _positive("config.model.rope_base", m.rope_base)
    if m.powernorm_warmup and m.norm != "powernorm":
        raise ConfigError(
            f"config.model.powernorm_warmup={m.powernorm_warmup} needs "
            f"config.model.norm='powernorm', not {m.norm!r}"
        )
    if m.sigma_reparam_head and (m.linear != "sigma_reparam" or m.tie_embeddings):
        raise ConfigError(
            "config.model.sigma_reparam_head=True needs config.model.linear='sigma_reparam' "
            f"(got {m.linear!r}) and tie_embeddings=False (got {m.tie_embeddings})"
        )
    _positive("config.model.logit_multiplier", m.logit_multiplier)
    if o.parametrization == "mup_full":
        want = o.mup_base_d_model / m.d_model
        if abs(m.logit_multiplier - want) > 1e-9 * want:
            raise ConfigError(
                f"config.model.logit_multiplier={m.logit_multiplier!r} must be "
                f"optim.mup_base_d_model/model.d_model={want!r} with "
                "config.optim.parametrization='mup_full'"
            )
    if m.attention_impl == "pallas" and (m.attention_score == "relu" or m.softplus_reweight):
        raise ConfigError(
            f"config.model.attention_impl='pallas' supports attention_score 'softmax' and "
            f"'softplus' without softplus_reweight; got attention_score={m.attention_score!r}, "
            f"softplus_reweight={m.softplus_reweight} (use attention_impl='xla')"
        )
    if m.softplus_reweight and m.attention_score != "softplus":
        raise ConfigError(
            "config.model.softplus_reweight=True needs config.model.attention_score="
            f"'softplus', not {m.attention_score!r}"
        )
    if not m.softplus_reweight_power >= 1:
        raise ConfigError(
            f"config.model.softplus_reweight_power={m.softplus_reweight_power!r} must be >= 1"
        )
    if not 0 <= m.n_local_heads <= m.n_heads:
        raise ConfigError(
            f"config.model.n_local_heads={m.n_local_heads} must be in "
            f"[0, config.model.n_heads={m.n_heads}]"
        )
    _positive("config.model.local_window", m.local_window)
    if m.sink_decorrelation and m.n_layers < 2:
        raise ConfigError(
            f"config.model.sink_decorrelation={m.sink_decorrelation!r} needs "
            f"config.model.n_layers >= 2 (it acts between blocks), got {m.n_layers}"
        )


def _validate_optim(o: OptimConfig, t: TrainConfig) -> None:
    _positive("config.optim.lr", o.lr)
    _positive("config.optim.eps", o.eps)
    for name in ("b1", "b2"):
        v = getattr(o, name)
        if not 0 <= v < 1:
            raise ConfigError(f"config.optim.{name}={v!r} must be in [0, 1)")
    if o.min_lr > o.lr:
        raise ConfigError(f"config.optim.min_lr={o.min_lr!r} must be <= config.optim.lr={o.lr!r}")
    if o.warmup_steps > t.steps:
        raise ConfigError(
            f"config.optim.warmup_steps={o.warmup_steps} is longer than "
            f"config.train.steps={t.steps}"
        )
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"config.optim.momentum={o.momentum!r} must be in [0, 1)")
    _positive("config.optim.spam_threshold", o.spam_threshold)
    if not o.spam_reset_interval > 20:
        raise ConfigError(
            f"config.optim.spam_reset_interval={o.spam_reset_interval} must be > 20 "
            "(spike clipping starts 20 updates after each reset)"
        )
    if not 0 < o.spam_density <= 1:
        raise ConfigError(
            f"config.optim.spam_density={o.spam_density!r} must be in (0, 1] (1 = dense)"
        )
    _positive("config.optim.adafactor_decay_rate", o.adafactor_decay_rate)
    _positive("config.optim.adafactor_min_dim_to_factor", o.adafactor_min_dim_to_factor)
    _positive("config.optim.mup_base_d_model", o.mup_base_d_model)
    if not 0 < o.decay_fraction <= 1:
        raise ConfigError(f"config.optim.decay_fraction={o.decay_fraction!r} must be in (0, 1]")
    if o.decay_shape == "exponential" and o.schedule in ("wsd", "wsd_s") and not o.min_lr > 0:
        raise ConfigError(
            f"config.optim.min_lr={o.min_lr!r} must be > 0 for "
            "config.optim.decay_shape='exponential' (a geometric decay never reaches 0)"
        )
    if not 1 <= o.wsd_cycles <= t.steps:
        raise ConfigError(
            f"config.optim.wsd_cycles={o.wsd_cycles} must be in [1, config.train.steps={t.steps}]"
        )
    if o.schedule != "wsd_s" and (o.wsd_cycles != 1 or o.wsd_decay_ends):
        raise ConfigError(
            f"config.optim.wsd_cycles={o.wsd_cycles} / wsd_decay_ends={list(o.wsd_decay_ends)} "
            f"need config.optim.schedule='wsd_s', not {o.schedule!r}"
        )
    if o.wsd_decay_ends and o.wsd_cycles != 1:
        raise ConfigError(
            f"config.optim.wsd_cycles={o.wsd_cycles} and config.optim.wsd_decay_ends="
            f"{list(o.wsd_decay_ends)} are both set; set one"
        )
    ends = o.wsd_decay_ends
    if any(b <= a for a, b in zip(ends, ends[1:], strict=False)) or (
        ends and not 0 < ends[-1] <= t.steps
    ):
        raise ConfigError(
            f"config.optim.wsd_decay_ends={list(ends)} must increase strictly, within "
            f"[1, config.train.steps={t.steps}]"
        )
    first_end = ends[0] if ends else t.steps // o.wsd_cycles
    if o.schedule in ("wsd", "wsd_s") and not o.warmup_steps < first_end:
        raise ConfigError(
            f"config.optim.warmup_steps={o.warmup_steps} must be shorter than the first "
            f"WSD cycle ({first_end} updates; config.optim.wsd_cycles / wsd_decay_ends)"
        )


def _validate_train(t: TrainConfig, m: ModelConfig, o: OptimConfig) -> None:
    _positive("config.train.steps", t.steps)
    for name in ("log_every", "eval_every", "eval_batches", "checkpoint_every", "max_to_keep"):
        _positive(f"config.train.{name}", getattr(t, name))
    _positive("config.train.divergence_loss", t.divergence_loss)
    _positive("config.train.tensor_parallel", t.tensor_parallel)
    if m.n_heads % t.tensor_parallel:  # then it divides d_model and the MLP width too
        raise ConfigError(
            f"config.train.tensor_parallel={t.tensor_parallel} must divide "
            f"config.model.n_heads={m.n_heads} (heads and MLP hidden units are split over it)"
        )
    bound = min(m.d_model, o.adafactor_min_dim_to_factor)
    if o.name == "adafactor" and t.scan_layers and m.n_layers >= bound:
        raise ConfigError(
            f"config.model.n_layers={m.n_layers} with config.train.scan_layers=True and "
            f"config.optim.name='adafactor' must be below min(model.d_model, "
            f"optim.adafactor_min_dim_to_factor) = {bound}: Adafactor factors a parameter's two "
            "largest dims, and a stacked layer axis that large would be one of them (set "
            "train.scan_layers=False)"
        )


def _validate_data(d: DataConfig, m: ModelConfig) -> None:
    _positive("config.data.seq_len", d.seq_len)
    _positive("config.data.batch_size", d.batch_size)
    if not 0 < d.eval_fraction < 1:
        raise ConfigError(f"config.data.eval_fraction={d.eval_fraction!r} must be in (0, 1)")
    if d.source == "text_files" and not d.paths:
        raise ConfigError("config.data.paths=() is empty; data.source='text_files' needs files")
    if d.source == "synthetic_markov":
        _positive("config.data.markov_zipf", d.markov_zipf)
        if not 1 <= d.markov_branching <= d.markov_vocab:
            raise ConfigError(
                f"config.data.markov_branching={d.markov_branching} must be in "
                f"[1, data.markov_vocab={d.markov_vocab}]"
            )
        if d.markov_vocab > m.vocab_size:
            raise ConfigError(
                f"config.data.markov_vocab={d.markov_vocab} is larger than "
                f"config.model.vocab_size={m.vocab_size}"
            )
    if d.source in ("stdlib", "text_files") and m.vocab_size < 256:
        raise ConfigError(
            f"config.model.vocab_size={m.vocab_size} is smaller than 256, the byte vocabulary "
            f"of data.source={d.source!r}"
        )


def _unused_fields(cfg: Config) -> list[tuple[str, str, bool]]:
    """(field, the setting it needs, whether that setting is on) for every field declared with
    ``needs``: one that acts only under another setting."""
    return [
        (f"{section}.{f.name}", setting, bool(on(cfg)))
        for section, f in _fields()
        if "needs" in f.metadata
        for on, setting in [f.metadata["needs"]]
    ]


def _refuse_unused(cfg: Config, explicit: frozenset[str] | set[str] = frozenset()) -> None:
    """A field that does nothing without another setting is refused (it would be silently
    ignored), naming both, when it was set explicitly or differs from its default."""
    default = Config()
    for key, setting, on in _unused_fields(cfg):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not on and (key in explicit or value != getattr(getattr(default, section), name)):
            raise ConfigError(
                f"config.{key}={value!r} has no effect without config.{setting}; "
                "set that too, or leave the field out"
            )
