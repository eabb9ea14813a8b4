"""The one model: embed → L pre-norm blocks (attention, gelu MLP) → final norm → logits.

Defaults follow Wortsman et al. 2023: no biases, RoPE, MLP 4·d, untied embeddings, embedding
init normal(1/√d), other weights truncated normal with std 1/√fan_in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stability.config import ModelConfig
from stability.models.attention import Attention, rope_tables
from stability.models.layers import Linear, make_norm


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        hidden = cfg.mlp_ratio * cfg.d_model
        self.fc1 = Linear(cfg.d_model, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(hidden, cfg.d_model, dtype=dtype, rngs=rngs)

    def __call__(self, x_MD: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x_MD)))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = make_norm(cfg, cfg.d_model)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = make_norm(cfg, cfg.d_model)
        self.mlp = Mlp(cfg, rngs=rngs)

    def __call__(self, x_MD: jax.Array, B: int, T: int, rope) -> tuple[jax.Array, dict]:
        h_MD, stats = self.attn(self.attn_norm(x_MD), B, T, rope)
        x_MD = x_MD + h_MD
        return x_MD + self.mlp(self.mlp_norm(x_MD)), stats


class Transformer(nnx.Module):
    """Decoder-only LM. ``__call__(tokens_BT, train=...) -> (logits_BTV float32, aux)``.

    ``aux`` maps metric names to values computed on device (see ``stability.metrics.expand_aux``):
    arrays of shape [L] are per-layer (``attn/max_logit`` → ``attn/max_logit/layer_i``), scalars
    are logged as they are, and keys starting with ``loss/`` are extra loss terms that the
    train step adds to the objective. ``train=False`` (evaluation) must not update any state.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, V = cfg.d_model, cfg.vocab_size
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (V, D), jnp.float32) * D**-0.5)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = make_norm(cfg, D)
        if not cfg.tie_embeddings:
            self.head = Linear(D, V, dtype=jnp.dtype(cfg.dtype), rngs=rngs)

    def __call__(
        self, tokens_BT: jax.Array, *, train: bool = True
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        B, T = tokens_BT.shape
        dtype = jnp.dtype(cfg.dtype)
        rope = rope_tables(T, cfg.d_model // cfg.n_heads, cfg.rope_base)
        x_MD = jnp.take(self.embed[...], tokens_BT.reshape(-1), axis=0).astype(dtype)
        layer_stats = []
        for block in self.blocks:
            x_MD, stats = block(x_MD, B, T, rope)
            layer_stats.append(stats)
        x_MD = self.final_norm(x_MD)
        if cfg.tie_embeddings:
            logits_MV = jnp.dot(x_MD, self.embed[...].astype(dtype).T)
        else:
            logits_MV = self.head(x_MD)
        aux = {f"attn/{k}": jnp.stack([s[k] for s in layer_stats]) for k in layer_stats[0]}
        return logits_MV.astype(jnp.float32).reshape(B, T, -1), aux
