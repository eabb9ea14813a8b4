"""Causal self-attention with the switches that act on it, and its instability statistics.

Query i (0-based) of a head sees the keys j <= i, or on a local head (LS-attention, Hajra 2025:
the first ``n_local_heads`` heads) only the ``local_window`` most recent of them, the query
included; N_i is how many keys it sees (i + 1 on a global head). Logits and weights by
``cfg.attention_score``:

  softmax   s = q·k/√H;  A = softmax(s)                            (Wortsman et al. 2023)
  softplus  s = log(H)·log(N_i)·q̂·k̂, q̂, k̂ ℓ2-normalised per head after RoPE;
            A = softplus(s)/(Σ softplus(s) + 1e-8), float32           (LSSA, Gao et al. 2025)
            ``softplus_reweight``: Ã = ReLU(N_i·A − o_i)^p renormalised, o_i = 0 for i < 3
            else 1 (LSSAR); a row with no weight above o_i/N_i keeps A
  relu      s = q·k/√H;  A = ReLU(s)/N_i, no row normalisation        (Guo et al. 2024)

``attn_softcap`` c > 0 caps the logits before the weights: s ← c·tanh(s/c) (Gemma 2).

Statistics (per layer, reduced on device, no gradient):
  max_logit    max over batch, heads, queries and visible keys of s (after scale and cap)
  entropy      mean over heads of the mean (over batch and queries) entropy, in nats, of the
               row-normalised weights A/ΣA (a ReLU row that is all zero has entropy 0)
  entropy_min  min over heads of that per-head mean
  bos_mass     mean over batch, heads and queries of the weight on key 0, as applied to the
               values (unnormalised for relu; 0 for queries outside a local head's window)
Softmax entropy is computed relative to the row max (log l − Σ p·(s − m)), accurate for logits
~1e4.

``attend`` is the XLA path: it materialises the [B, N, T, S] weights and returns per-row
statistics [B, N, T] with the meaning of ``stability.kernels.reference.AttentionStats``
(per-head windows as a mask, score kinds, soft-cap). ``attend_flash`` (``attention_impl =
"pallas"``) returns the same from the Pallas kernels of ``stability.kernels.flash`` without
any [T, S] tensor: the statistics come from the kernel, and the weight on key 0 from the saved
log-normaliser. The kernels do softmax and softplus (not ReLU attention or LSSAR re-weighting).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from stability.config import ModelConfig
from stability.kernels.reference import apply_softcap, visible_mask
from stability.models.layers import LayerNorm, make_linear
from stability.sharding import constrain

NEG_INF = -1e30  # finite, so that 0·(s − m) stays 0 on masked entries
SOFTPLUS_EPS = 1e-8  # LSSA's denominator guard
LSSAR_UNSHIFTED_ROWS = 3  # o_i = 0 for the first 3 queries


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


def row_entropy(w_BNTS: jax.Array) -> jax.Array:
    """Entropy (nats) of each row of non-negative weights after normalising it to sum 1;
    0 for an all-zero row."""
    total_BNT1 = w_BNTS.sum(-1, keepdims=True)
    p_BNTS = w_BNTS / jnp.where(total_BNT1 > 0, total_BNT1, 1.0)
    return -(p_BNTS * jnp.log(jnp.where(p_BNTS > 0, p_BNTS, 1.0))).sum(-1)


def lssar_reweight(a_BNTS: jax.Array, n_NT1: jax.Array, power: float) -> jax.Array:
    """LSSAR: Ã = ReLU(N_i·A − o_i)^p / Σ_j ReLU(N_i·A − o_i)^p (o_i = 0 for the first 3 queries,
    else 1), computed relative to the row max so that ^p neither overflows nor underflows. A row
    where no weight exceeds o_i/N_i (only possible for a uniform row) keeps A."""
    T = a_BNTS.shape[-2]
    o_T1 = jnp.where(jnp.arange(T) < LSSAR_UNSHIFTED_ROWS, 0.0, 1.0)[:, None]
    r_BNTS = jax.nn.relu(n_NT1 * a_BNTS - o_T1)
    m_BNT1 = jax.lax.stop_gradient(r_BNTS.max(-1, keepdims=True))  # Ã is invariant to r's scale
    some_BNT1 = m_BNT1 > 0
    w_BNTS = jnp.power(r_BNTS / jnp.where(some_BNT1, m_BNT1, 1.0), power)
    w_BNTS = w_BNTS / jnp.where(some_BNT1, w_BNTS.sum(-1, keepdims=True), 1.0)
    return jnp.where(some_BNT1, w_BNTS, a_BNTS)


def head_windows(cfg: ModelConfig) -> tuple[int | None, ...]:
    """Each head's window: ``local_window`` for the first ``n_local_heads``, None (global) after."""
    return tuple(cfg.local_window if n < cfg.n_local_heads else None for n in range(cfg.n_heads))


def visible_keys(cfg: ModelConfig, T: int) -> tuple[jax.Array, jax.Array]:
    """(visible [N, T, T] bool: query i of head n sees key j, N_i [N, T, 1] float32: how many
    keys each query sees) for causal attention with ``head_windows(cfg)``."""
    windows = head_windows(cfg) if cfg.n_local_heads else None
    visible_NTS = visible_mask(T, T, causal=True, windows=windows, num_heads=cfg.n_heads)
    return visible_NTS, visible_NTS.sum(-1, keepdims=True).astype(jnp.float32)


def _unit_heads(x_BTNH: jax.Array) -> jax.Array:
    x = x_BTNH.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), 1e-12))


def attention_logits(
    q_BTNH: jax.Array, k_BSNH: jax.Array, n_NT1: jax.Array, cfg: ModelConfig
) -> jax.Array:
    """Float32 logits s [B, N, T, S] of kind ``cfg.attention_score`` (module docstring), capped
    by ``cfg.attn_softcap``; ``n_NT1`` is the number of keys each query sees."""
    H = q_BTNH.shape[-1]
    if cfg.attention_score == "softplus":
        q_BTNH, k_BSNH = _unit_heads(q_BTNH), _unit_heads(k_BSNH)
        scale = math.log(H) * jnp.log(n_NT1)[None]
    else:
        scale = H**-0.5
    s_BNTS = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH, preferred_element_type=jnp.float32)
    return apply_softcap(s_BNTS * scale, cfg.attn_softcap or None)


def attention_weights(
    s_BNTS: jax.Array, visible_NTS: jax.Array, n_NT1: jax.Array, cfg: ModelConfig
) -> tuple[jax.Array, jax.Array]:
    """(weights A [B, N, T, S] of kind ``cfg.attention_score`` over the visible keys,
    entropy [B, N, T] of the row-normalised weights, without gradient); ``visible_NTS`` and
    ``n_NT1`` as from :func:`visible_keys`."""
    if cfg.attention_score == "softmax":
        p_BNTS, entropy_BNT, _ = softmax_with_stats(s_BNTS, visible_NTS)
        return p_BNTS, jax.lax.stop_gradient(entropy_BNT)
    if cfg.attention_score == "relu":
        w_BNTS = jnp.where(visible_NTS, jax.nn.relu(s_BNTS), 0.0) / n_NT1
    else:
        a_BNTS = jnp.where(visible_NTS, jax.nn.softplus(s_BNTS), 0.0)
        w_BNTS = a_BNTS / (a_BNTS.sum(-1, keepdims=True) + SOFTPLUS_EPS)
        if cfg.softplus_reweight:
            w_BNTS = lssar_reweight(w_BNTS, n_NT1, cfg.softplus_reweight_power)
    return w_BNTS, row_entropy(jax.lax.stop_gradient(w_BNTS))


class RowStats(NamedTuple):
    """Per-query statistics [B, N, T], float32, no gradient (module docstring)."""

    max_logit: jax.Array  # max over visible keys of the logit s
    entropy: jax.Array  # entropy (nats) of the row-normalised weights
    bos_mass: jax.Array  # weight on key 0


def attend(
    q_BTNH: jax.Array, k_BSNH: jax.Array, v_BSNH: jax.Array, cfg: ModelConfig
) -> tuple[jax.Array, RowStats]:
    """Causal attention with per-head windows (``head_windows``), the score kind and soft-cap
    of ``cfg``, materialising the weights. Returns (output [B, T, N, H] in v's dtype, stats)."""
    visible_NTS, n_NT1 = visible_keys(cfg, q_BTNH.shape[1])
    s_BNTS = attention_logits(q_BTNH, k_BSNH, n_NT1, cfg)
    w_BNTS, entropy_BNT = attention_weights(s_BNTS, visible_NTS, n_NT1, cfg)
    out_BTNH = jnp.einsum("BNTS,BSNH->BTNH", w_BNTS.astype(v_BSNH.dtype), v_BSNH)
    max_BNT = jnp.where(visible_NTS, s_BNTS, NEG_INF).max(-1)
    stats = RowStats(max_BNT, entropy_BNT, w_BNTS[..., 0])
    return out_BTNH, RowStats(*(jax.lax.stop_gradient(x) for x in stats))


def visible_counts(cfg: ModelConfig, T: int) -> jax.Array:
    """N_i [N, T]: keys query i of each head sees (i + 1, or min(i + 1, window) on a local head),
    computed without a [T, S] mask."""
    n_T = jnp.arange(1, T + 1, dtype=jnp.float32)
    return jnp.stack([n_T if w is None else jnp.minimum(n_T, w) for w in head_windows(cfg)])


def attend_flash(
    q_BTNH: jax.Array, k_BSNH: jax.Array, v_BSNH: jax.Array, cfg: ModelConfig
) -> tuple[jax.Array, RowStats]:
    """``attend`` through the flash kernels (module docstring)."""
    from stability.kernels import flash

    T, H = q_BTNH.shape[1], q_BTNH.shape[-1]
    windows = head_windows(cfg) if cfg.n_local_heads else None
    n_NT = visible_counts(cfg, T)
    if cfg.attention_score == "softplus":
        # s = log(H)·log(N_i)·q̂·k̂: fold the per-row scale into q, so the kernel's scale is 1.
        row_scale_TN = (math.log(H) * jnp.log(n_NT)).T
        q_BTNH = _unit_heads(q_BTNH) * row_scale_TN[None, :, :, None]
        k_BSNH, scale = _unit_heads(k_BSNH), 1.0
    else:
        scale = H**-0.5
    softcap = cfg.attn_softcap or None
    out_BTNH, st = flash.attention(
        q_BTNH,
        k_BSNH,
        v_BSNH,
        causal=True,
        window=windows,
        score=cfg.attention_score,
        softcap=softcap,
        scale=scale,
    )
    # Weight on key 0: exp(log w(s_i0) − log_norm_i), where key 0 is visible.
    s0_BNT = apply_softcap(
        jnp.einsum("BTNH,BNH->BNT", q_BTNH.astype(jnp.float32), k_BSNH[:, 0].astype(jnp.float32))
        * scale,
        softcap,
    )
    log_w0 = s0_BNT if cfg.attention_score == "softmax" else jnp.log(jax.nn.softplus(s0_BNT))
    sees_first_NT = n_NT == jnp.arange(1, T + 1, dtype=jnp.float32)[None]
    bos_BNT = jnp.where(sees_first_NT[None], jnp.exp(log_w0 - st.log_norm), 0.0)
    stats = RowStats(st.max_logit, st.entropy, bos_BNT)
    return out_BTNH, RowStats(*(jax.lax.stop_gradient(x) for x in stats))


ATTEND = {"xla": attend, "pallas": attend_flash}


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, N = cfg.d_model, cfg.n_heads
        H = D // N
        self.cfg, self.n_heads, self.head_dim = cfg, N, H
        self.q = make_linear(cfg, D, N * H, axes=("embed", "heads"), rngs=rngs)
        self.k = make_linear(cfg, D, N * H, axes=("embed", "heads"), rngs=rngs)
        self.v = make_linear(cfg, D, N * H, axes=("embed", "heads"), rngs=rngs)
        self.o = make_linear(cfg, N * H, D, axes=("heads", "embed"), rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = LayerNorm(H, cfg.norm_eps)
            self.k_norm = LayerNorm(H, cfg.norm_eps)

    def __call__(
        self, x_MD: jax.Array, B: int, T: int, rope, *, train: bool = True
    ) -> tuple[jax.Array, dict]:
        cfg, N, H = self.cfg, self.n_heads, self.head_dim
        q_BTNH = self.q(x_MD, train=train).reshape(B, T, N, H)
        k_BTNH = self.k(x_MD, train=train).reshape(B, T, N, H)
        v_BTNH = self.v(x_MD, train=train).reshape(B, T, N, H)
        q_BTNH, k_BTNH, v_BTNH = (
            constrain(x, ("batch", None, "heads", None)) for x in (q_BTNH, k_BTNH, v_BTNH)
        )
        if cfg.qk_norm:
            q_BTNH, k_BTNH = self.q_norm(q_BTNH), self.k_norm(k_BTNH)
        q_BTNH, k_BTNH = apply_rope(q_BTNH, *rope), apply_rope(k_BTNH, *rope)

        with jax.named_scope("attention_core"):  # scores, softmax, weighted sum, statistics
            out_BTNH, rows = ATTEND[cfg.attention_impl](q_BTNH, k_BTNH, v_BTNH, cfg)
            entropy_N = rows.entropy.mean((0, 2))
            stats = {
                "max_logit": rows.max_logit.max(),
                "entropy": entropy_N.mean(),
                "entropy_min": entropy_N.min(),
                "bos_mass": rows.bos_mass.mean(),
            }
        return self.o(out_BTNH.reshape(B * T, N * H), train=train), stats
