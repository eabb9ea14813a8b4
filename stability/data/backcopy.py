"""Bigram-backcopy (Guo et al. 2024, "Active-Dormant Attention Heads").

Tokens are ``backcopy_vocab`` symbols 0..V-1 and BOS = V. A sequence is BOS, then a first
symbol drawn from the bigram's stationary distribution with the triggers removed, then: after
a trigger the next token copies the token before the trigger; otherwise it is drawn from the
bigram given the previous token. Triggers are the ``backcopy_triggers`` symbols of highest
stationary probability. By induction the token before a trigger is never a trigger, so copies
are never triggers and every copy is well defined.

The bigram. The reference uses the character bigrams of Tiny Shakespeare (65 symbols), which
cannot be downloaded here. Instead it is a fixed random sparse chain (seed ``LANGUAGE_SEED``,
independent of the run seed): symbol t has global weight w_t ∝ (t+1)^-ZIPF; each symbol gets
``BRANCHING`` distinct successors drawn with probability ∝ w and moves to them with
probability ∝ w. With 64 symbols the 3 triggers then carry ~29% of the stationary mass (space,
e and t carry ~30% of Tiny Shakespeare), about a quarter of the targets are copies, and a
Markov target's entropy is ~2.6 nats (Shannon's F2 for English letters: 3.3 bits ≈ 2.3 nats).

Batches: ``{"tokens": int32[B, T+1], "mask_icl": bool[B, T], "mask_markov": bool[B, T]}``;
over targets ``tokens[:, 1:]``, ``mask_icl`` marks copies (the previous token is a trigger)
and ``mask_markov`` every other target (including the first symbol after BOS). The masks
partition the targets.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stability.config import ConfigError
from stability.data.stream import IndexedStream
from stability.data.synthetic import stationary

# The chain is a fixed function of these, so every run and sweep point studies one language.
LANGUAGE_SEED = 1234
ZIPF = 0.5  # exponent of the global symbol weights
BRANCHING = 16  # successors per symbol (all symbols when the vocabulary is smaller)


def zipf_bigram(vocab: int, seed: int = LANGUAGE_SEED) -> np.ndarray:
    """Transition matrix P[s, t] over ``vocab`` symbols (rows sum to 1)."""
    rng = np.random.default_rng(seed)
    w = np.arange(1, vocab + 1, dtype=np.float64) ** -ZIPF
    P = np.zeros((vocab, vocab))
    for s in range(vocab):
        succ = rng.choice(vocab, size=min(BRANCHING, vocab), replace=False, p=w / w.sum())
        P[s, succ] = w[succ] / w[succ].sum()
    return P


def _cdf(p: np.ndarray) -> np.ndarray:
    """CDF along the last axis, exactly 1 from the last positive entry on: for u in [0, 1),
    the index #{cdf <= u} always has positive probability (no rounding past the end)."""
    positive = p > 0
    positives_after = np.flip(np.cumsum(np.flip(positive, -1), -1), -1) - positive
    return np.where(positives_after == 0, 1.0, np.cumsum(p, axis=-1))


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats along the last axis (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)


def expected_losses(
    P: np.ndarray, is_trigger: np.ndarray, first: np.ndarray, seq_len: int
) -> tuple[float, float, float]:
    """Exact Bayes-optimal losses of bigram-backcopy sequences with ``seq_len`` targets.

    Returns (mean over all targets, mean over Markov targets, expected fraction of copy
    targets); losses in nats per token. A copy costs 0 and a Markov target after symbol s
    costs H(P[s]) (the first, H(first)); the "Markov" mean is a ratio of expectations, as a
    masked mean over a large batch is. Computed by propagating the joint law J[a, b] of
    (x_{j-1}, x_j): J'[b, c] = m[b]·P[b, c] if b is not a trigger, J[c, b] if it is.
    """
    row_h = _entropy(P)
    markov = ~is_trigger
    loss, markov_mass = float(_entropy(first)), 1.0  # the first target
    J, m = np.zeros_like(P), first
    for _ in range(1, seq_len):
        loss += float(m[markov] @ row_h[markov])
        markov_mass += float(m[markov].sum())
        J = (m * markov)[:, None] * P + (J * is_trigger[None, :]).T
        m = J.sum(axis=0)
    return loss / seq_len, loss / markov_mass, 1.0 - markov_mass / seq_len


class BigramBackcopySource:
    """Bigram-backcopy batches, a pure function of (seed, step).

    ``cfg`` is a DataConfig (fields ``backcopy_vocab``, ``backcopy_triggers``, ``seq_len``,
    ``batch_size``); ``vocab_size`` is the model's and must hold the symbols and BOS.
    ``loss_floor`` is the exact Bayes loss averaged over all targets (nats/token);
    ``description["markov_entropy"]`` is the floor of the loss on Markov targets alone (the
    floor on copies is 0).
    """

    def __init__(self, cfg: Any, vocab_size: int):
        V, k = cfg.backcopy_vocab, cfg.backcopy_triggers
        if V < 2:
            raise ConfigError(f"config.data.backcopy_vocab={V} must be >= 2")
        if vocab_size < V + 1:
            raise ConfigError(
                f"config.model.vocab_size={vocab_size} is smaller than data.backcopy_vocab + 1 "
                f"= {V + 1} (the symbols and BOS)"
            )
        if not 1 <= k < V:
            raise ConfigError(
                f"config.data.backcopy_triggers={k} must be in [1, data.backcopy_vocab - 1 = "
                f"{V - 1}]"
            )
        self._cfg = cfg
        self.bos_id = V
        self._P = zipf_bigram(V)
        pi = stationary(self._P)
        self.triggers = np.sort(np.argsort(-pi, kind="stable")[:k])
        self._is_trigger = np.zeros(V, bool)
        self._is_trigger[self.triggers] = True
        first = np.where(self._is_trigger, 0.0, pi)
        if not first.sum() > 0:
            raise ConfigError(
                f"config.data.backcopy_triggers={k} leaves no non-trigger symbol of the "
                f"{V}-symbol bigram to start a sequence with"
            )
        self._first = first / first.sum()
        self._cdf, self._first_cdf = _cdf(self._P), _cdf(self._first)
        self.loss_floor, markov_entropy, icl_fraction = expected_losses(
            self._P, self._is_trigger, self._first, cfg.seq_len
        )
        self.description = {
            "source": "bigram_backcopy",
            "bigram": f"random sparse Zipf (seed {LANGUAGE_SEED}, exponent {ZIPF}, "
            f"{min(BRANCHING, V)} successors per symbol)",
            "symbols": V,
            "bos_id": V,
            "triggers": self.triggers.tolist(),
            "trigger_probability": float(pi[self.triggers].sum()),
            "icl_fraction": icl_fraction,
            "markov_entropy": markov_entropy,
            "loss_floor": self.loss_floor,
        }

    def _batch(self, seed: int, step: int) -> dict[str, np.ndarray]:
        B, T = self._cfg.batch_size, self._cfg.seq_len
        rng = np.random.default_rng((seed, step))
        u = rng.random((B, T + 1))
        x = np.empty((B, T + 1), np.int32)
        x[:, 0] = self.bos_id
        x[:, 1] = (self._first_cdf <= u[:, 1:2]).sum(axis=1)
        for t in range(2, T + 1):
            prev = x[:, t - 1]
            drawn = (self._cdf[prev] <= u[:, t : t + 1]).sum(axis=1)
            x[:, t] = np.where(self._is_trigger[prev], x[:, t - 2], drawn)
        mask_icl = np.zeros((B, T), bool)
        mask_icl[:, 1:] = self._is_trigger[x[:, 1:T]]
        return {"tokens": x, "mask_icl": mask_icl, "mask_markov": ~mask_icl}

    def train_stream(self, seed: int, rows=None) -> IndexedStream:
        return IndexedStream(self._batch, seed, rows)

    def eval_batches(self, n: int) -> list[dict[str, np.ndarray]]:
        # A seed no training stream uses (training seeds are non-negative), as in synthetic.py.
        return [self._batch(-1 % 2**32, i) for i in range(n)]
