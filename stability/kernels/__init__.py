"""Attention kernels: ``reference`` (plain jnp, the ground truth) and ``flash`` (Pallas).

Both expose ``attention(q_BTNH, k_BSNH, v_BSNH, *, causal, window, score, alpha, softcap,
scale) -> (output, AttentionStats)`` with identical semantics.
"""

from stability.kernels import flash, reference
from stability.kernels.reference import AttentionStats

__all__ = ["AttentionStats", "flash", "reference"]
