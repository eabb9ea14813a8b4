"""Any tfds text dataset, read by random access (ArrayRecord) and grain, without TensorFlow.

The dataset must already be prepared under ``data.tfds_data_dir`` in array_record format
(``tfds build NAME --data_dir=DIR --file_format=array_record``); nothing is ever downloaded:
this is ``tfds.data_source(name, split=..., data_dir=..., download=False)``, opened through
the builder so that each failure names its config field.

Each document becomes ``[BOS] + ids + [EOS]`` (no BOS when the tokenizer has none). The
documents are concatenated and cut into consecutive windows of ``seq_len + 1`` tokens: no
padding, every token used exactly once per epoch, and a window may span documents (EOS, then
the next document's BOS).

Order: the global batch is a pure function of (seed, step), whatever the number of JAX
processes. Row r of the batch packs its own document stream: documents r, r+B, r+2B, ... of
the split (B the batch size; the rows' shares are disjoint and cover it), reshuffled every
epoch from (seed, r, epoch). A process reads only the rows its devices hold. A row's position
is (number of the document at its head in its endless shuffled order, tokens of that document
already used), so ``state()`` is three integers per row (row, document, offset) and
``restore`` re-reads one document per row. Eval batches come from the unshuffled held-out
split, cycled when ``n`` batches need more tokens than it holds.
"""

from __future__ import annotations

import collections
import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from stability import workdir as W
from stability.config import ConfigError
from stability.data.sentencepiece_tokenizer import SentencePieceTokenizer

# Documents at the head of the eval split over which eval_bytes_per_token is measured.
BYTES_PER_TOKEN_DOCS = 1000
# Read-ahead: threads that read and tokenize documents, and documents kept ready (a step of
# 256 x 512 tokens of C4 is ~300 documents). ~1.5M tokens/s on 2 CPU cores.
READ_THREADS = min(16, os.cpu_count() or 1)
READ_OPTIONS = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=256)


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; BOS is 256 and EOS 257 (vocabulary 258)."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, str):
            text = text.encode("utf-8")
        return np.frombuffer(text, np.uint8).astype(np.int32)

    def encode_batch(self, texts: list[str | bytes], threads: int = 1) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")


Tokenizer = ByteTokenizer | SentencePieceTokenizer


def make_tokenizer(cfg: Any, vocab_size: int) -> Tokenizer:
    """The tokenizer named by ``cfg.tokenizer``; its ids must fit the model's ``vocab_size``."""
    if cfg.tokenizer == "bytes":
        tok, what = ByteTokenizer(), "data.tokenizer='bytes'"
    elif cfg.tokenizer == "sentencepiece":
        tok = SentencePieceTokenizer(cfg.tokenizer_path)
        what = f"data.tokenizer_path={cfg.tokenizer_path!r}"
    else:
        raise ConfigError(
            f"config.data.tokenizer={cfg.tokenizer!r} is unknown; valid: 'bytes', 'sentencepiece'"
        )
    if tok.vocab_size > vocab_size:
        raise ConfigError(
            f"config.model.vocab_size={vocab_size} is smaller than the {tok.vocab_size} tokens "
            f"of {what}"
        )
    return tok


def bits_per_byte(nats_per_token: float, bytes_per_token: float) -> float:
    """A loss in bits per UTF-8 byte of text, from nats per token and bytes per token."""
    return nats_per_token / (math.log(2) * bytes_per_token)


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def register_builders() -> None:
    """Register tfds's text builders (C4, lm1b, wikipedia, pg19, ...). Without TensorFlow,
    tfds registers a builder only when its module is imported, so ``tfds.builder("c4")``
    fails until ``tensorflow_datasets.text`` is imported (lazily: a few ms)."""
    import tensorflow_datasets.text  # noqa: F401


def open_split(name: str, split: str, data_dir: str, field: str) -> Sequence[dict[str, Any]]:
    """Random-access records of ``split`` (tfds split syntax) of the prepared dataset ``name``.

    ``field`` is the config field that named ``split``, for error messages.
    """
    if not data_dir:
        raise ConfigError(
            "config.data.tfds_data_dir='' is empty; give the directory where the dataset was "
            "prepared (tfds build NAME --data_dir=DIR --file_format=array_record)"
        )
    full_dir = W.path(os.path.expanduser(data_dir))  # local or gs://
    if not full_dir.is_dir():
        raise ConfigError(
            f"config.data.tfds_data_dir={data_dir!r} is not a directory; give the directory "
            f"where the dataset was prepared"
        )
    if not name:
        raise ConfigError(
            "config.data.tfds_name='' is empty; give a tfds dataset name, e.g. 'lm1b' or "
            "'c4/en:3.1.0'"
        )
    register_builders()
    try:
        builder = tfds.builder(name, data_dir=os.fspath(full_dir), try_gcs=False)
    except ValueError as err:  # includes tfds' DatasetNotFoundError
        raise ConfigError(
            f"config.data.tfds_name={name!r} is neither a registered tfds dataset nor prepared "
            f"under config.data.tfds_data_dir={data_dir!r} ({_first_line(err)})"
        ) from None
    try:
        return builder.as_data_source(split=split)
    except NotImplementedError:  # tfds' answer when there are no array_record files
        raise ConfigError(
            f"config.data.tfds_name={name!r} is not prepared in array_record format under "
            f"config.data.tfds_data_dir={data_dir!r}; run `tfds build {name} "
            f"--data_dir={data_dir} --file_format=array_record`"
        ) from None
    except ValueError as err:
        valid = ", ".join(builder.info.splits) or "none recorded"
        raise ConfigError(
            f"{field}={split!r} is not a usable split of {name} ({_first_line(err)}); "
            f"valid splits: {valid}"
        ) from None


class PackedStream:
    """(The eval batches.) Consecutive windows of ``window`` tokens cut from the concatenated ``documents``.

    ``documents[i]`` is the i-th document (int32 ids with BOS/EOS) of an endless sequence.
    Batches are ``{"tokens": int32[rows, window]}``. ``state()`` is ``{"document": i,
    "offset": k}``: the document at the head of the stream and how many of its tokens earlier
    batches used.
    """

    def __init__(self, documents: grain.MapDataset, rows: int, window: int):
        self._rows, self._window = rows, window
        self._iter = iter(documents.to_iter_dataset(READ_OPTIONS))
        self.restore({"document": 0, "offset": 0})

    def next(self) -> dict[str, np.ndarray]:
        need = self._rows * self._window
        pieces = []
        while need:
            if self._offset == len(self._doc):
                self._doc, self._index, self._offset = next(self._iter), self._index + 1, 0
            take = min(need, len(self._doc) - self._offset)
            pieces.append(self._doc[self._offset : self._offset + take])
            self._offset += take
            need -= take
        return {"tokens": np.concatenate(pieces).reshape(self._rows, self._window)}

    def state(self) -> dict[str, Any]:
        return {"document": self._index, "offset": self._offset}

    def restore(self, state: dict[str, Any]) -> None:
        self._index, self._offset = int(state["document"]), int(state["offset"])
        self._iter.set_state({"next_index": self._index})
        self._doc = next(self._iter)


def _get(records, keys: list[int]) -> list:
    """``records[k]`` for every k: one batched read where the source has one (ArrayRecord's
    ``__getitems__``; the source of ``tfds.testing.mock_data`` has a broken one)."""
    try:
        return list(records.__getitems__(keys))
    except (AttributeError, TypeError):
        return [records[k] for k in keys]


@functools.lru_cache(maxsize=1024)
def _permutation(seed: int, row: int, epoch: int, n: int) -> np.ndarray:
    """The order of a row's n documents in one epoch (shared by every stream of the process:
    the chunks of a sweep read the same rows in the same orders)."""
    return np.random.default_rng((seed, row, epoch)).permutation(n).astype(np.int32)


class RowStreams:
    """Rows ``rows`` of the global batches ``{"tokens": int32[B, window]}`` (module
    docstring): each row packs its own shuffled share of ``records``.

    Reading keeps up by batching: a row that runs out of documents takes the next one from
    its read-ahead queue, and when a queue is empty every row's queue is refilled to
    ``lookahead`` documents in one batched read of the data source and one tokenizer call on
    ``threads`` threads (``tokens_of``: examples → token arrays). The read-ahead is not part
    of the state, so batches, checkpoints and resumes are those of one document at a time.
    """

    def __init__(
        self,
        records,
        tokens_of,
        seed: int,
        rows,
        batch_size: int,
        window: int,
        lookahead: int = 16,
        threads: int = 1,
    ):
        self._records, self._tokens_of, self._seed = records, tokens_of, seed
        self._rows, self._batch_size, self._window = list(rows), batch_size, window
        self._lookahead, self._threads = max(1, lookahead), threads
        self.restore({"batch_size": batch_size, "rows": [[r, 0, 0] for r in self._rows]})

    def _document(self, row: int, position: int) -> int:
        """The split index of document ``position`` of ``row``'s endless shuffled order."""
        n = len(range(row, len(self._records), self._batch_size))
        epoch, j = divmod(position, n)
        return row + self._batch_size * int(_permutation(self._seed, row, epoch, n)[j])

    def _read(self, wanted: list[tuple[int, int]]) -> list[np.ndarray]:
        """Token arrays of the documents (local row k, position p) of ``wanted``: one batched
        read, one tokenizer call."""
        docs = [self._document(self._rows[k], p) for k, p in wanted]
        return self._tokens_of(_get(self._records, docs), self._threads)

    def _refill(self) -> None:
        """Every row's read-ahead queue up to ``lookahead`` documents."""
        wanted = [
            (k, self._position[k] + 1 + len(q) + i)
            for k, q in enumerate(self._ahead)
            for i in range(self._lookahead - len(q))
        ]
        for (k, _), tokens in zip(wanted, self._read(wanted), strict=True):
            self._ahead[k].append(tokens)

    def next(self) -> dict[str, np.ndarray]:
        out = np.empty((len(self._rows), self._window), np.int32)
        filled = np.zeros(len(self._rows), np.int64)
        while True:
            need = [k for k in range(len(self._rows)) if filled[k] < self._window]
            if not need:
                return {"tokens": out}
            for k in need:
                if self._offset[k] == len(self._tokens[k]):
                    if not self._ahead[k]:
                        self._refill()
                    self._position[k] += 1
                    self._offset[k] = 0
                    self._tokens[k] = self._ahead[k].popleft()
                take = min(self._window - filled[k], len(self._tokens[k]) - self._offset[k])
                out[k, filled[k] : filled[k] + take] = self._tokens[k][
                    self._offset[k] : self._offset[k] + take
                ]
                filled[k] += take
                self._offset[k] += take

    def state(self) -> dict[str, Any]:
        rows = [
            [int(r), int(p), int(o)]
            for r, p, o in zip(self._rows, self._position, self._offset, strict=True)
        ]
        return {"batch_size": self._batch_size, "rows": rows}

    def restore(self, state: dict[str, Any]) -> None:
        saved = {int(r): (int(p), int(o)) for r, p, o in state["rows"]}
        missing = [r for r in self._rows if r not in saved]
        if int(state["batch_size"]) != self._batch_size or missing:
            raise ValueError(
                f"stream state of batch size {state['batch_size']} lacks rows {missing[:5]} of "
                f"this batch size {self._batch_size}"
            )
        self._position = [saved[r][0] for r in self._rows]
        self._offset = [saved[r][1] for r in self._rows]
        self._ahead: list[collections.deque] = [collections.deque() for _ in self._rows]
        self._tokens = self._read(list(enumerate(self._position)))


class TfdsSource:
    """Packed windows of a tfds text dataset (module docstring: order, sharding, state).

    ``cfg`` is a DataConfig (fields ``tfds_name``, ``tfds_data_dir``, ``tfds_split``,
    ``tfds_eval_split``, ``tfds_text_feature``, ``tokenizer``, ``tokenizer_path``, ``seq_len``,
    ``batch_size``); ``vocab_size`` is the model's.
    """

    loss_floor = None

    def __init__(self, cfg: Any, vocab_size: int):
        self._cfg = cfg
        # the dataset first: a missing directory is named before the tokenizer's vocabulary
        self._train = self._open(cfg.tfds_split, "config.data.tfds_split")
        self._eval = self._open(cfg.tfds_eval_split, "config.data.tfds_eval_split")
        self.tokenizer = make_tokenizer(cfg, vocab_size)
        # Bytes of text per token (BOS/EOS included: the model is scored on them too).
        self.eval_bytes_per_token = self._bytes_per_token(self._eval)
        self.description = {
            "source": "tfds",
            "tfds_name": cfg.tfds_name,
            "train_split": cfg.tfds_split,
            "eval_split": cfg.tfds_eval_split,
            "train_documents": len(self._train),
            "eval_documents": len(self._eval),
            "tokenizer": cfg.tokenizer,
            "tokenizer_path": cfg.tokenizer_path if cfg.tokenizer == "sentencepiece" else None,
            "tokenizer_vocab_size": self.tokenizer.vocab_size,
            "bos_id": self.tokenizer.bos_id,
            "eos_id": self.tokenizer.eos_id,
            "eval_bytes_per_token": self.eval_bytes_per_token,
        }

    def _open(self, split: str, field: str) -> Sequence[dict[str, Any]]:
        cfg = self._cfg
        records = open_split(cfg.tfds_name, split, cfg.tfds_data_dir, field)
        if field == "config.data.tfds_split" and len(records) < cfg.batch_size:
            raise ConfigError(
                f"{field}={split!r} of {cfg.tfds_name} yields {len(records)} documents; need at "
                f"least one per batch row (config.data.batch_size={cfg.batch_size})"
            )
        if not len(records):
            raise ConfigError(f"{field}={split!r} of {cfg.tfds_name} yields no documents")
        try:
            example = records[0]
        except (OSError, RuntimeError) as err:  # e.g. a shard file missing
            raise ConfigError(
                f"config.data.tfds_data_dir={cfg.tfds_data_dir!r}: cannot read {field}={split!r} "
                f"of {cfg.tfds_name} ({_first_line(err)})"
            ) from None
        feature = cfg.tfds_text_feature
        if feature not in example or not isinstance(example[feature], (str, bytes)):
            raise ConfigError(
                f"config.data.tfds_text_feature={feature!r} is not a text feature of "
                f"{cfg.tfds_name}; its features: {', '.join(example)}"
            )
        return records

    def _document_tokens(self, example: dict[str, Any]) -> np.ndarray:
        return self._documents_tokens([example])[0]

    def _documents_tokens(
        self, examples: list[dict[str, Any]], threads: int = 1
    ) -> list[np.ndarray]:
        """[BOS] + ids + [EOS] of each example's text (no BOS when the tokenizer has none)."""
        tok = self.tokenizer
        ids = tok.encode_batch([ex[self._cfg.tfds_text_feature] for ex in examples], threads)
        bos = np.asarray([] if tok.bos_id is None else [tok.bos_id], np.int32)
        eos = np.asarray([tok.eos_id], np.int32)
        return [np.concatenate([bos, x, eos]) for x in ids]

    def _bytes_per_token(self, records: Sequence[dict[str, Any]]) -> float:
        n_bytes = n_tokens = 0
        for i in range(min(len(records), BYTES_PER_TOKEN_DOCS)):
            text = records[i][self._cfg.tfds_text_feature]
            n_bytes += len(text.encode("utf-8") if isinstance(text, str) else text)
            n_tokens += len(self._document_tokens(records[i]))
        return n_bytes / n_tokens

    def train_stream(self, seed: int, rows=None) -> RowStreams:
        cfg = self._cfg
        rows = range(cfg.batch_size) if rows is None else rows
        return RowStreams(
            self._train,
            self._documents_tokens,
            seed,
            rows,
            cfg.batch_size,
            cfg.seq_len + 1,
            threads=READ_THREADS,
        )

    def eval_batches(self, n: int) -> list[dict[str, np.ndarray]]:
        """The first ``n`` global batches of the held-out split, in its stored order."""
        documents = grain.MapDataset.source(self._eval).repeat().map(self._document_tokens)
        stream = PackedStream(documents, self._cfg.batch_size, self._cfg.seq_len + 1)
        return [stream.next() for _ in range(n)]


PACKAGES = {"apache_beam": "apache-beam"}  # module -> the PyPI package that brings it


def prepare(name: str, data_dir: str, manual_dir: str | None = None) -> dict[str, int]:
    """Build the tfds dataset ``name`` under ``data_dir`` in ArrayRecord format (what
    ``data.source='tfds'`` reads), from files already downloaded to ``manual_dir`` when the
    dataset needs them (C4: the c4 json.gz shards; lm1b: its tarball). Nothing is built twice:
    a prepared dataset is left as it is. Returns the examples per split."""
    if not name:
        raise ConfigError(
            "--name='' is empty; give a tfds dataset name, e.g. 'lm1b' or 'c4/en:3.1.0'"
        )
    register_builders()
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except ValueError as err:  # includes tfds' DatasetNotFoundError
        raise ConfigError(f"--name={name!r} is not a tfds dataset ({_first_line(err)})") from None
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    try:
        builder.download_and_prepare(download_config=config)
    except ModuleNotFoundError as err:  # C4 is built with Apache Beam
        package = PACKAGES.get(err.name or "", err.name)
        raise ConfigError(
            f"--name={name!r}: building it needs the Python package {package}, which is not "
            f"installed: pip install {package}"
        ) from None
    except Exception as err:  # noqa: BLE001 - a missing download: one line
        raise ConfigError(
            f"--name={name!r}: tfds could not prepare it under --data-dir={data_dir!r} "
            f"({type(err).__name__}: {_first_line(err)})"
        ) from None
    return {split: info.num_examples for split, info in builder.info.splits.items()}
