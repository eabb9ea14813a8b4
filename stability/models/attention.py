"""Causal self-attention with the switches that act on it, and its instability statistics.

Statistics (per layer, reduced on device):
  max_logit    max over batch, heads, queries and visible keys of the scaled pre-softmax logit
  entropy      mean over heads of the mean (over batch and queries) row entropy, in nats
  entropy_min  min over heads of that per-head mean
Entropy is computed relative to the row max (log l − Σ p·(s − m)), accurate for logits ~1e4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stability.config import ModelConfig
from stability.models.layers import LayerNorm, Linear

NEG_INF = -1e30  # finite, so that 0·(s − m) stays 0 on masked entries


def rope_tables(T: int, H: int, base: float) -> tuple[jax.Array, jax.Array]:
    """sin, cos tables [T, H/2] for rotary embeddings."""
    inv_freq = base ** (-jnp.arange(0, H, 2, dtype=jnp.float32) / H)
    angle_TK = jnp.arange(T, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.sin(angle_TK), jnp.cos(angle_TK)


def apply_rope(x_BTNH: jax.Array, sin_TK: jax.Array, cos_TK: jax.Array) -> jax.Array:
    """Rotate pairs (x[..., :H/2], x[..., H/2:]) by position-dependent angles."""
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin_TK[None, :, None, :], cos_TK[None, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BTNH.dtype)


def softmax_with_stats(s_BNTS: jax.Array, mask_TS: jax.Array):
    """Row softmax of float32 logits over visible keys, plus per-row entropy and max."""
    s_BNTS = jnp.where(mask_TS, s_BNTS, NEG_INF)
    m_BNT1 = s_BNTS.max(-1, keepdims=True)
    e_BNTS = jnp.exp(s_BNTS - m_BNT1)
    l_BNT1 = e_BNTS.sum(-1, keepdims=True)
    p_BNTS = e_BNTS / l_BNT1
    t_BNT = (e_BNTS * (s_BNTS - m_BNT1)).sum(-1)
    entropy_BNT = jnp.log(l_BNT1[..., 0]) - t_BNT / l_BNT1[..., 0]
    return p_BNTS, entropy_BNT, m_BNT1[..., 0]


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, N = cfg.d_model, cfg.n_heads
        H = D // N
        dtype = jnp.dtype(cfg.dtype)
        self.cfg, self.n_heads, self.head_dim = cfg, N, H
        self.q = Linear(D, N * H, dtype=dtype, rngs=rngs)
        self.k = Linear(D, N * H, dtype=dtype, rngs=rngs)
        self.v = Linear(D, N * H, dtype=dtype, rngs=rngs)
        self.o = Linear(N * H, D, dtype=dtype, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = LayerNorm(H, cfg.norm_eps)
            self.k_norm = LayerNorm(H, cfg.norm_eps)

    def __call__(self, x_MD: jax.Array, B: int, T: int, rope) -> tuple[jax.Array, dict]:
        cfg, N, H = self.cfg, self.n_heads, self.head_dim
        q_BTNH = self.q(x_MD).reshape(B, T, N, H)
        k_BTNH = self.k(x_MD).reshape(B, T, N, H)
        v_BTNH = self.v(x_MD).reshape(B, T, N, H)
        if cfg.qk_norm:
            q_BTNH, k_BTNH = self.q_norm(q_BTNH), self.k_norm(k_BTNH)
        q_BTNH, k_BTNH = apply_rope(q_BTNH, *rope), apply_rope(k_BTNH, *rope)

        s_BNTS = jnp.einsum(
            "BTNH,BSNH->BNTS", q_BTNH, k_BTNH, preferred_element_type=jnp.float32
        ) * (H**-0.5)
        mask_TS = jnp.tril(jnp.ones((T, T), bool))
        p_BNTS, entropy_BNT, max_BNT = softmax_with_stats(s_BNTS, mask_TS)
        out_BTNH = jnp.einsum("BNTS,BSNH->BTNH", p_BNTS.astype(v_BTNH.dtype), v_BTNH)

        entropy_N = jax.lax.stop_gradient(entropy_BNT.mean((0, 2)))
        stats = {
            "max_logit": jax.lax.stop_gradient(max_BNT.max()),
            "entropy": entropy_N.mean(),
            "entropy_min": entropy_N.min(),
        }
        return self.o(out_BTNH.reshape(B * T, N * H)), stats
