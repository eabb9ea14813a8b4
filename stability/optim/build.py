"""OptimConfig → an optax transformation whose scalars are injectable per run.

Hyperparameters injected by ``optax.inject_hyperparams`` are set by the train step at every
update (so the schedule, the peak LR, λ and ε can be traced, per-run values):

  learning_rate       η_t, this update's LR (from ``schedules.learning_rate``)
  weight_decay        λ
  peak_learning_rate  η_max, for the independent-decay factor s_t = η_t/η_max
  eps                 ε of adamw and spam (unused by the other optimizers)

Every optimizer is the chain: global-norm clip of g → direction Δ (``optim.name``) → μParam
LR multiplier m (per leaf; 1 for "standard") → decay and LR:

  independent (Wortsman et al. 2023): θ ← θ − η_t·m·Δ − (η_t/η_max)·λ·θ
  coupled (Loshchilov & Hutter):      θ ← θ − η_t·(m·Δ + λ·θ)
  coupled, spam (its reference's order, decaying the stepped params):
                                      θ ← (θ − η_t·m·Δ)·(1 − η_t·λ)

Weight decay applies to matrices and embeddings (ndim ≥ 2), not to norm scales.

μParam (``parametrization``; Yang et al. 2022 for Adam, as used by Wortsman et al. 2023 §3.2.4):
the update of some kernels is multiplied by m = base_fan_in/fan_in = mup_base_d_model/d_model
(every such fan-in is proportional to the width d), all others by 1:

  mup_simple   the paper's "μParam (simple)": "scale the LR for linear layers by
               base-fan-in/fan-in": every linear layer's kernel, the blocks' q, k, v, o, fc1,
               fc2 (``is_hidden_matrix``) and the head (the readout, fan-in d); the embedding (a
               lookup whose fan-in is the vocabulary), norm scales and σReparam's γ keep m = 1
  mup_hidden   the hidden matrices only (the head keeps m = 1): what "mup_simple" did in
               release 0.2.0 (a checkpoint of that release with "mup_simple" is refused)
  mup_full     mup_hidden here, and the model multiplies its output logits by the same m
               (``model.logit_multiplier``): not the paper's μParam (full), which instead
               changes the head's init, the attention scale (1/d_h) and the query init

It scales only the gradient step, not the decay, as ``mup.MuAdamW`` does (it divides the LR by
the width multiplier and multiplies λ by it).

Directions Δ:

  adamw      Adam's m̂/(√v̂ + ε) (b1, b2, eps)
  spam       SPAM (``spam.scale_by_spam``): Adam with spike clipping and momentum resets
  lion       sign(β1·m + (1−β1)·g), m ← β2·m + (1−β2)·g (b1, b2)
  adafactor  g/√v̂ with v̂ factored over rows and columns of matrices (β2_t = 1 −
             t^(−adafactor_decay_rate), ε1 = 1e-30 on g²), then each param's direction
             clipped to RMS ``adafactor_clip``, then an EMA with β1 when b1 > 0. No
             parameter-scale (relative) step: η is absolute, as for the other optimizers.
  sgd        heavy-ball momentum trace Δ ← g + momentum·Δ (plain SGD when 0)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from stability.config import ConfigError, OptimConfig
from stability.metrics import map_layout, matrices, rms_by_path
from stability.optim.spam import decay_stepped_params, scale_by_spam, spam_diagnostics

ADAFACTOR_EPS = 1e-30  # ε1 of Adafactor, added to g² (squared-gradient units)
ADAM_FAMILY = ("adamw", "spam")
# μParam's hidden matrices: 2-D kernels of these layers inside the blocks, whose fan-in grows
# with d_model (attention q, k, v, o and MLP fc1, fc2).
HIDDEN_LAYERS = ("q", "k", "v", "o", "fc1", "fc2")


def is_hidden_matrix(path: str, ndim: int) -> bool:
    """μParam's rule for a leaf at '/'-joined ``path``: a 2-D ``kernel`` of a block's q, k, v, o,
    fc1 or fc2 layer. Embedding (fan-in = vocabulary), head (the readout), norm scales and
    σReparam's γ are not hidden matrices."""
    parts = path.split("/")
    return (
        ndim == 2
        and parts[0] == "blocks"
        and len(parts) >= 2
        and parts[-1] == "kernel"
        and parts[-2] in HIDDEN_LAYERS
    )


def is_head(path: str, ndim: int) -> bool:
    """The readout's kernel (``head/kernel``, [d, vocab]: fan-in d)."""
    return ndim == 2 and path.split("/")[0] == "head" and path.endswith("kernel")


def mup_multipliers(params, base_d_model: int, d_model: int, head: bool = False):
    """Per-leaf μParam LR multipliers shaped like ``params``' tree (Python floats).

    Hidden matrices (and with ``head`` the readout) get base_fan_in/fan_in, where base_fan_in
    is the same matrix's fan-in (its first axis: kernels are [d_in, d_out]) in the base model
    of width ``base_d_model``; every such fan-in is proportional to d_model (d for
    q/k/v/fc1/head, n_heads·d_head = d for o, mlp_ratio·d for fc2), so this is
    base_d_model/d_model. Every other leaf gets 1. ``params`` may hold arrays or
    ``jax.ShapeDtypeStruct``s.
    """

    def one(where, x, stacked):
        ndim = len(x.shape) - stacked
        if not (is_hidden_matrix(where, ndim) or (head and is_head(where, ndim))):
            return 1.0
        fan_in = x.shape[stacked]
        base_fan_in = fan_in * base_d_model / d_model
        return base_fan_in / fan_in

    return map_layout(one, params)


def scale_by_mup(
    base_d_model: int, d_model: int, head: bool = False
) -> optax.GradientTransformation:
    """Multiplies each update by its ``mup_multipliers`` entry (stateless; the multipliers come
    from the updates' own tree paths and shapes, so it works per run under ``jax.vmap``)."""

    def update_fn(updates, state, params=None):
        del params
        mult = mup_multipliers(updates, base_d_model, d_model, head)
        return jax.tree.map(lambda u, m: u if m == 1.0 else u * m, updates, mult), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def clip_by_block_rms(threshold: float) -> optax.GradientTransformation:
    """``optax.clip_by_block_rms``: each parameter's update divided by max(1, rms/threshold),
    a stacked variable's layers each a parameter of their own."""

    def clip(path, u, stacked):
        axes = tuple(range(stacked, u.ndim))
        rms = jnp.sqrt(jnp.mean(jnp.square(u), axis=axes, keepdims=True))
        return u / jnp.maximum(1.0, rms / threshold)

    def update_fn(updates, state, params=None):
        del params
        return map_layout(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def direction(cfg: OptimConfig, eps: float | jax.Array) -> optax.GradientTransformation:
    """The optimizer's update direction Δ, before μParam, LR and decay (module docstring);
    ``eps`` is ε of adamw and spam (``cfg.eps``, or its traced per-run value)."""
    if cfg.name == "adamw":
        return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=eps)
    if cfg.name == "spam":
        return scale_by_spam(
            b1=cfg.b1,
            b2=cfg.b2,
            eps=eps,
            threshold=cfg.spam_threshold,
            reset_interval=cfg.spam_reset_interval,
            reset_warmup_steps=cfg.spam_reset_warmup,
            density=None if cfg.spam_density == 1.0 else cfg.spam_density,
        )
    if cfg.name == "lion":
        return optax.scale_by_lion(b1=cfg.b1, b2=cfg.b2)
    if cfg.name == "adafactor":
        parts = [
            optax.scale_by_factored_rms(
                decay_rate=cfg.adafactor_decay_rate,
                min_dim_size_to_factor=cfg.adafactor_min_dim_to_factor,
                epsilon=ADAFACTOR_EPS,
            )
        ]
        if cfg.adafactor_clip > 0:
            parts.append(clip_by_block_rms(cfg.adafactor_clip))
        if cfg.b1 > 0:
            parts.append(optax.ema(cfg.b1, debias=False))
        return optax.chain(*parts)
    if cfg.name == "sgd":
        return optax.trace(decay=cfg.momentum)
    raise ConfigError(f"config.optim.name={cfg.name!r} is not a known optimizer")


def make_optimizer(cfg: OptimConfig, *, d_model: int | None = None) -> optax.GradientTransformation:
    """The optimizer of ``cfg`` (module docstring). ``d_model``, the model's width, is needed
    for μParam (``cfg.parametrization`` other than "standard")."""
    mup = cfg.parametrization != "standard"
    if mup and d_model is None:
        raise ConfigError(
            f"config.optim.parametrization={cfg.parametrization!r} needs the model width: "
            "call make_optimizer(cfg.optim, d_model=cfg.model.d_model)"
        )

    def factory(learning_rate, weight_decay, peak_learning_rate, eps):
        parts = []
        if cfg.grad_clip > 0:
            parts.append(optax.clip_by_global_norm(cfg.grad_clip))
        parts.append(direction(cfg, eps))
        if mup:
            head = cfg.parametrization == "mup_simple"
            parts.append(scale_by_mup(cfg.mup_base_d_model, d_model, head))
        if cfg.weight_decay_mode == "coupled" and cfg.name == "spam":
            parts.append(optax.scale_by_learning_rate(learning_rate))
            decay = decay_stepped_params(weight_decay, learning_rate)
            parts.append(optax.masked(decay, matrices))
        elif cfg.weight_decay_mode == "coupled":
            parts.append(optax.add_decayed_weights(weight_decay, mask=matrices))
            parts.append(optax.scale_by_learning_rate(learning_rate))
        else:
            parts.append(optax.scale_by_learning_rate(learning_rate))
            scale = -weight_decay * learning_rate / peak_learning_rate
            parts.append(optax.add_decayed_weights(scale, mask=matrices))
        return optax.chain(*parts)

    return optax.inject_hyperparams(factory)(
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, peak_learning_rate=cfg.lr, eps=cfg.eps
    )


def optimizer_metrics(cfg: OptimConfig, opt_state, grads) -> dict[str, jax.Array]:
    """Optimizer diagnostics logged every step (per run under ``jax.vmap``).

    adamw, spam: ``grad/rms_over_eps/{path}``, each gradient's RMS over ε (Wortsman et al.
    §3.4: the update collapses as it nears 1). spam: also ``spam/clipped_fraction`` (fraction
    of entries clipped as spikes at the last update) and ``spam/steps_since_reset`` (updates
    since the last momentum reset, 0 on a reset). ε is the state's (per run, traced)."""
    out = {}
    if cfg.name in ADAM_FAMILY:
        out.update(rms_by_path("grad/rms_over_eps", grads, 1.0 / opt_state.hyperparams["eps"]))
    if cfg.name == "spam":
        out.update(spam_diagnostics(opt_state))
    return out


def set_hyperparams(opt_state, **values):
    """A copy of an ``inject_hyperparams`` state with the given hyperparameters replaced."""
    hp = dict(opt_state.hyperparams)
    for k, v in values.items():
        hp[k] = jnp.asarray(v, hp[k].dtype)
    return opt_state._replace(hyperparams=hp)
