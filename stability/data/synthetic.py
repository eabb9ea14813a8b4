"""Synthetic languages with known statistics.

Zipf–Markov: a first-order Markov chain over ``markov_vocab`` tokens in which every state has
``markov_branching`` successors whose probabilities follow a Zipf law (p_r ∝ r^-a). Its entropy
rate H = Σ_s π(s) H(P[s, :]) (π the stationary distribution) is the loss floor: no model can
beat it, so ``train/loss - loss_floor`` is the excess loss. It needs no attention: use it for
optimizer and output-logit studies, not for attention instabilities.
"""

from __future__ import annotations

import numpy as np

from stability.config import DataConfig
from stability.data.stream import IndexedStream

# The chain is a fixed function of this seed, independent of the run seed, so that every run
# (and every sweep point) studies the same language.
LANGUAGE_SEED = 1234


def zipf_markov_matrix(vocab: int, branching: int, zipf: float, seed: int = LANGUAGE_SEED):
    """Transition matrix P[s, t] (rows sum to 1)."""
    rng = np.random.default_rng(seed)
    weights = np.arange(1, branching + 1, dtype=np.float64) ** -zipf
    weights /= weights.sum()
    P = np.zeros((vocab, vocab))
    for s in range(vocab):
        P[s, rng.choice(vocab, size=branching, replace=False)] = weights
    return P


def stationary(P: np.ndarray) -> np.ndarray:
    """Stationary distribution π = πP (power iteration from uniform)."""
    pi = np.full(P.shape[0], 1.0 / P.shape[0])
    for _ in range(10_000):
        nxt = pi @ P
        if np.abs(nxt - pi).max() < 1e-13:
            break
        pi = nxt
    return nxt / nxt.sum()


def entropy_rate(P: np.ndarray) -> float:
    """H = Σ_s π(s) Σ_t −P[s,t] log P[s,t], in nats per token."""
    with np.errstate(divide="ignore", invalid="ignore"):
        row_h = -np.where(P > 0, P * np.log(P), 0.0).sum(axis=1)
    return float(stationary(P) @ row_h)


def sample_chain(P: np.ndarray, pi: np.ndarray, rng: np.random.Generator, shape) -> np.ndarray:
    """Sequences [B, L] started from π, sampled by inverse-CDF in a vectorised loop."""
    B, L = shape
    cdf = np.cumsum(P, axis=1)
    cdf[:, -1] = 1.0
    out = np.empty((B, L), np.int32)
    out[:, 0] = np.searchsorted(np.cumsum(pi), rng.random(B) * (1 - 1e-12))
    u = rng.random((B, L))
    for t in range(1, L):
        rows = cdf[out[:, t - 1]]
        out[:, t] = (rows < u[:, t : t + 1]).sum(axis=1)
    return out


class ZipfMarkovSource:
    def __init__(self, cfg: DataConfig):
        self._cfg = cfg
        self._P = zipf_markov_matrix(cfg.markov_vocab, cfg.markov_branching, cfg.markov_zipf)
        self._pi = stationary(self._P)
        self.loss_floor = entropy_rate(self._P)
        self.description = {"source": "synthetic_markov", "entropy_rate": self.loss_floor}

    def _batch(self, seed: int, step: int) -> dict[str, np.ndarray]:
        cfg = self._cfg
        rng = np.random.default_rng((seed, step))
        return {"tokens": sample_chain(self._P, self._pi, rng, (cfg.batch_size, cfg.seq_len + 1))}

    def train_stream(self, seed: int, rows=None) -> IndexedStream:
        return IndexedStream(self._batch, seed, rows)

    def eval_batches(self, n: int) -> list[dict[str, np.ndarray]]:
        # A seed no training stream uses (training seeds are non-negative).
        return [self._batch(-1 % 2**32, i) for i in range(n)]
