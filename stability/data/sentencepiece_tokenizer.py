"""SentencePiece tokenization from a model file (e.g. the T5 vocabulary of Wortsman et al.),
local or on a bucket (``gs://...``: the file is read through ``etils.epath``)."""

from __future__ import annotations

import os

import numpy as np
import sentencepiece as spm

from stability import workdir as W
from stability.config import ConfigError


class SentencePieceTokenizer:
    """Token ids of a SentencePiece ``.model`` file; ids lie in ``[0, vocab_size)``.

    ``bos_id`` is None for models without a BOS piece (the T5 vocabulary has none: documents
    are then separated by EOS alone). An EOS piece is required. ``field`` is the config field
    that named ``path``, for error messages.
    """

    def __init__(self, path: str, field: str = "config.data.tokenizer_path"):
        if not path:
            raise ConfigError(
                f"{field}='' is empty; data.tokenizer='sentencepiece' needs the path of a "
                f"SentencePiece .model file"
            )
        full = W.path(os.path.expanduser(path))
        if not full.exists() or full.is_dir():
            raise ConfigError(
                f"{field}={path!r} does not exist; give the path of a SentencePiece .model file"
            )
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=full.read_bytes())
        except RuntimeError as err:
            reason = str(err).splitlines()[0]
            raise ConfigError(
                f"{field}={path!r} is not a SentencePiece model ({reason}); give a .model file "
                f"written by SentencePieceTrainer"
            ) from None
        if self._sp.eos_id() < 0:
            raise ConfigError(
                f"{field}={path!r} has no EOS piece; packing needs one to separate documents"
            )
        self.path = path
        self.vocab_size: int = self._sp.get_piece_size()
        self.bos_id: int | None = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id: int = self._sp.eos_id()

    def encode(self, text: str | bytes) -> np.ndarray:
        """int32 ids of ``text`` (bytes are decoded as UTF-8), without BOS/EOS."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str | bytes], threads: int = 1) -> list[np.ndarray]:
        """:meth:`encode` of each text, ``threads`` of them at once (SentencePiece's own
        threads, outside the GIL)."""
        texts = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts]
        return [np.asarray(ids, np.int32) for ids in self._sp.encode(texts, num_threads=threads)]

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])
