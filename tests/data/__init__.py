"""Helpers shared by the data tests: generated documents and a SentencePiece model of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import sentencepiece as spm

# Letters with multi-byte UTF-8 ones, so that bytes per token differs from characters per token.
ALPHABET = list("abcdefghijklmnopqrstuvwxyzéüß")


def generated_documents(n: int, seed: int) -> list[str]:
    """``n`` distinct documents ("d<i> " then 0-40 random words, single spaces); doc 0 is ""."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(ALPHABET, size=rng.integers(1, 9))) for _ in range(300)]
    docs = [""]
    for i in range(1, n):
        docs.append(" ".join([f"d{seed}x{i}", *rng.choice(words, size=rng.integers(0, 41))]))
    return docs


def train_sentencepiece(directory: Path, texts: list[str], **options) -> str:
    """Train a small SentencePiece model (vocabulary 96) on ``texts``; return its path."""
    prefix = str(directory / "sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t for t in texts if t]),
        model_prefix=prefix,
        vocab_size=96,
        character_coverage=1.0,
        minloglevel=2,
        **options,
    )
    return prefix + ".model"
