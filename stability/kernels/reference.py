"""Plain-jnp attention with attention statistics: what attention *is* in this codebase.

Every kernel (``flash.py``) must agree with :func:`attention` on outputs, statistics and
gradients. Layouts: queries ``[B, T, N, H]``, keys and values ``[B, S, N, H]``; statistics
``[B, N, T]``. Masks, score kinds and the numerically careful statistics live here once;
the kernels import the element-wise maths (:func:`log_weight`, :func:`log_weight_grad`,
:func:`apply_softcap`, :func:`softcap_grad`) rather than re-deriving it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from jax import lax

Score = Literal["softmax", "softplus"]

# Below this logit, log(softplus(s)) = s + O(e^s) to float32 precision; using s there keeps
# the log-weight finite where softplus(s) underflows.
SOFTPLUS_LINEAR_BELOW = -15.0


class AttentionStats(NamedTuple):
    """Per-query attention statistics, ``[B, N, T]`` float32, carrying no gradient."""

    log_norm: jax.Array  # log of the row normaliser: softmax logsumexp(s); softplus log Σ sp(s)^α
    max_logit: jax.Array  # max over visible keys of the scaled (and soft-capped) logit s
    entropy: jax.Array  # entropy (nats) of the row-normalised attention weights


def resolve_arguments(
    q_BTNH: jax.Array,
    k_BSNH: jax.Array,
    v_BSNH: jax.Array,
    *,
    causal: bool,
    window: Sequence[int | None] | None,
    score: str,
    alpha: float,
    softcap: float | None,
    scale: float | None,
) -> tuple[tuple[int | None, ...] | None, float]:
    """Validates an attention call; returns (per-head windows or None, logit scale).

    The windows tuple is None when no head has a window (every head global).
    """
    if q_BTNH.ndim != 4 or k_BSNH.ndim != 4 or v_BSNH.ndim != 4:
        raise ValueError(
            f"q, k, v must be [B, T, N, H] / [B, S, N, H]; got shapes {q_BTNH.shape}, "
            f"{k_BSNH.shape}, {v_BSNH.shape}"
        )
    b, t, n, h = q_BTNH.shape
    if k_BSNH.shape != v_BSNH.shape or (k_BSNH.shape[0], *k_BSNH.shape[2:]) != (b, n, h):
        raise ValueError(
            f"k and v must be [B, S, N, H] with q's B, N, H = {(b, n, h)}; got k "
            f"{k_BSNH.shape}, v {v_BSNH.shape}"
        )
    dtypes = {jnp.dtype(x.dtype) for x in (q_BTNH, k_BSNH, v_BSNH)}
    if len(dtypes) != 1 or dtypes.pop() not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(
            f"q, k, v dtypes must all be float32 or all bfloat16; got {q_BTNH.dtype}, "
            f"{k_BSNH.dtype}, {v_BSNH.dtype}"
        )
    if causal and k_BSNH.shape[1] != t:
        raise ValueError(
            f"causal attention needs as many keys as queries; got T={t}, S={k_BSNH.shape[1]}"
        )
    if score not in get_args(Score):
        raise ValueError(f"score={score!r}; valid: {get_args(Score)}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha}; must be a finite positive number")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap={softcap}; must be None or a finite positive number")
    if scale is None:
        scale = 1.0 / math.sqrt(h)
    elif not math.isfinite(scale):
        raise ValueError(f"scale={scale}; must be finite")
    windows = None
    if window is not None:
        windows = tuple(window)
        if len(windows) != n:
            raise ValueError(f"window has {len(windows)} entries; needs one per head (N={n})")
        for w in windows:
            if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
                raise ValueError(f"window entry {w!r}; must be None (global) or an int >= 1")
        if all(w is None for w in windows):
            windows = None
        elif not causal:
            raise ValueError(f"window={list(windows)} needs causal=True")
    return windows, float(scale)


def visible_mask(
    q_len: int, kv_len: int, *, causal: bool, windows: Sequence[int | None] | None, num_heads: int
) -> jax.Array:
    """[N, T, S] bool: query i of head n sees key j iff (j <= i if causal) and i - j < window[n]."""
    i_TS = jnp.arange(q_len)[:, None]
    j_TS = jnp.arange(kv_len)[None, :]
    mask_NTS = jnp.ones((num_heads, q_len, kv_len), bool)
    if causal:
        mask_NTS &= (j_TS <= i_TS)[None]
    if windows is not None:
        w_N11 = jnp.array([kv_len + q_len if w is None else w for w in windows])[:, None, None]
        mask_NTS &= (i_TS - j_TS)[None] < w_N11
    return mask_NTS


def apply_softcap(s: jax.Array, softcap: float | None) -> jax.Array:
    """softcap·tanh(s/softcap); identity when softcap is None."""
    return s if softcap is None else softcap * jnp.tanh(s / softcap)


def softcap_grad(s_capped: jax.Array, softcap: float | None) -> jax.Array | float:
    """d(capped)/d(raw) as a function of the capped logit: 1 - (s/softcap)²."""
    return 1.0 if softcap is None else 1.0 - jnp.square(s_capped / softcap)


def log_weight(s: jax.Array, score: Score, alpha: float) -> jax.Array:
    """u = log of the unnormalised weight: s (softmax) or α·log softplus(s) (softplus).

    Softplus attention is softmax over u, which is how the kernels share one online
    normaliser and keep it finite when every softplus(s) underflows.
    """
    if score == "softmax":
        return s
    linear = s < SOFTPLUS_LINEAR_BELOW
    s_hi = jnp.where(linear, SOFTPLUS_LINEAR_BELOW, s)  # where, not max: exact grad at the edge
    return alpha * jnp.where(linear, s, jnp.log(jax.nn.softplus(s_hi)))


def log_weight_grad(s: jax.Array, score: Score, alpha: float) -> jax.Array | float:
    """du/ds for :func:`log_weight`: 1 (softmax) or α·sigmoid(s)/softplus(s) (softplus)."""
    if score == "softmax":
        return 1.0
    linear = s < SOFTPLUS_LINEAR_BELOW
    s_hi = jnp.where(linear, SOFTPLUS_LINEAR_BELOW, s)
    e = jnp.exp(-jnp.abs(s_hi))
    sigmoid = jnp.where(s_hi >= 0, 1.0, e) / (1.0 + e)
    return alpha * jnp.where(linear, 1.0, sigmoid / jax.nn.softplus(s_hi))


def attention(
    q_BTNH: jax.Array,
    k_BSNH: jax.Array,
    v_BSNH: jax.Array,
    *,
    causal: bool = True,
    window: Sequence[int | None] | None = None,
    score: Score = "softmax",
    alpha: float = 1.0,
    softcap: float | None = None,
    scale: float | None = None,
) -> tuple[jax.Array, AttentionStats]:
    """Attention with per-query statistics, materialising the [B, N, T, S] weights.

    Logits s = softcap·tanh(scale·q·k / softcap) (no cap when softcap is None; scale defaults
    to 1/√H). Weights over the visible keys: softmax(s), or softplus(s)^α / Σ softplus(s)^α.
    ``window[n]`` is head n's left window (query i sees keys i - window < j <= i; None =
    global), so local and global heads run in one call. Computes in float32; the output has
    the input dtype. Returns (output [B, T, N, H], :class:`AttentionStats`).
    """
    windows, scale = resolve_arguments(
        q_BTNH,
        k_BSNH,
        v_BSNH,
        causal=causal,
        window=window,
        score=score,
        alpha=alpha,
        softcap=softcap,
        scale=scale,
    )
    b, t, n, h = q_BTNH.shape
    hp = lax.Precision.HIGHEST
    s_BNTS = scale * jnp.einsum(
        "BTNH,BSNH->BNTS", q_BTNH, k_BSNH, preferred_element_type=jnp.float32, precision=hp
    )
    s_BNTS = apply_softcap(s_BNTS, softcap)
    visible_1NTS = visible_mask(t, k_BSNH.shape[1], causal=causal, windows=windows, num_heads=n)[
        None
    ]
    u_BNTS = jnp.where(visible_1NTS, log_weight(s_BNTS, score, alpha), -jnp.inf)
    # Every row sees at least its own key, so the max is finite.
    m_BNT1 = lax.stop_gradient(jnp.max(u_BNTS, axis=-1, keepdims=True))
    e_BNTS = jnp.exp(u_BNTS - m_BNT1)  # 0 at masked keys
    l_BNT1 = jnp.sum(e_BNTS, axis=-1, keepdims=True)
    p_BNTS = e_BNTS / l_BNT1
    o_BTNH = jnp.einsum("BNTS,BSNH->BTNH", p_BNTS, v_BSNH.astype(jnp.float32), precision=hp).astype(
        q_BTNH.dtype
    )

    e_BNTS, l_BNT1, u_BNTS = (lax.stop_gradient(x) for x in (e_BNTS, l_BNT1, u_BNTS))
    # Entropy relative to the row max: log l - Σ e (u - m) / l, exact for huge logits.
    t_BNT1 = jnp.sum(jnp.where(visible_1NTS, e_BNTS * (u_BNTS - m_BNT1), 0.0), -1, keepdims=True)
    stats = AttentionStats(
        log_norm=(m_BNT1 + jnp.log(l_BNT1))[..., 0],
        max_logit=jnp.max(jnp.where(visible_1NTS, lax.stop_gradient(s_BNTS), -jnp.inf), -1),
        entropy=(jnp.log(l_BNT1) - t_BNT1 / l_BNT1)[..., 0],
    )
    return o_BTNH, stats
