"""OptimConfig → an optax transformation whose scalars are injectable per run.

Hyperparameters injected by ``optax.inject_hyperparams`` are set by the train step at every
update (so the schedule, the peak LR and λ can be traced, per-run values):

  learning_rate       η_t, this update's LR (from ``schedules.learning_rate``)
  weight_decay        λ
  peak_learning_rate  η_max, for the independent-decay factor s_t = η_t/η_max

AdamW, independent decay (Wortsman et al. 2023): θ ← θ − η_t·Adam(g) − (η_t/η_max)·λ·θ.
AdamW, coupled decay (Loshchilov & Hutter):      θ ← θ − η_t·(Adam(g) + λ·θ).
Weight decay applies to matrices and embeddings (ndim ≥ 2), not to norm scales.
"""

from __future__ import annotations

import jax
import optax

from stability.config import OptimConfig


def decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    def factory(learning_rate, weight_decay, peak_learning_rate):
        parts = []
        if cfg.grad_clip > 0:
            parts.append(optax.clip_by_global_norm(cfg.grad_clip))
        parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
        if cfg.weight_decay_mode == "coupled":
            parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
            parts.append(optax.scale_by_learning_rate(learning_rate))
        else:
            parts.append(optax.scale_by_learning_rate(learning_rate))
            scale = -weight_decay * learning_rate / peak_learning_rate
            parts.append(optax.add_decayed_weights(scale, mask=decay_mask))
        return optax.chain(*parts)

    return optax.inject_hyperparams(factory)(
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, peak_learning_rate=cfg.lr
    )


def optimizer_metrics(cfg: OptimConfig, opt_state, grads) -> dict[str, jax.Array]:
    """Optimizer diagnostics logged every step. Adam family: ``grad/rms_over_eps/{path}``,
    the gradient RMS over Adam's ε (the paper's §3.4 signal: updates collapse as it nears 1)."""
    from stability.metrics import rms_by_path

    return rms_by_path("grad/rms_over_eps", grads, 1.0 / cfg.eps)


def set_hyperparams(opt_state, **values):
    """A copy of an ``inject_hyperparams`` state with the given hyperparameters replaced."""
    hp = dict(opt_state.hyperparams)
    for k, v in values.items():
        hp[k] = jax.numpy.asarray(v, hp[k].dtype)
    return opt_state._replace(hyperparams=hp)
