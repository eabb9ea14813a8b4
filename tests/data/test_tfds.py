import json
import math
import shutil
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds

from stability.config import ConfigError
from stability.data.tfds import ByteTokenizer, RowStreams, TfdsSource, bits_per_byte

from . import generated_documents, train_sentencepiece

TRAIN_DOCS = generated_documents(41, seed=0)  # odd: the two shards differ in size
EVAL_DOCS = generated_documents(12, seed=1)
BYTES = ByteTokenizer()


class StabilityTestText(tfds.core.GeneratorBasedBuilder):
    """A local text dataset: TRAIN_DOCS and EVAL_DOCS under the feature "text"."""

    VERSION = tfds.core.Version("1.0.0")
    # No checksums file to look up. (tfds' lookup beside a class defined in a package needs
    # `importlib_resources`, which this environment lacks.)
    code_path = None

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(TRAIN_DOCS),
            "validation": self._generate_examples(EVAL_DOCS),
        }

    def _generate_examples(self, docs):
        for i, doc in enumerate(docs):
            yield i, {"text": doc}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    StabilityTestText(data_dir=str(path), file_format="array_record").download_and_prepare()
    return path


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"), TRAIN_DOCS + EVAL_DOCS)


def make_config(data_dir, **overrides):
    fields = dict(
        tfds_name="stability_test_text",
        tfds_data_dir=str(data_dir),
        tfds_split="train",
        tfds_eval_split="validation",
        tfds_text_feature="text",
        tokenizer="bytes",
        tokenizer_path="",
        seq_len=15,
        batch_size=4,
    )
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


def doc_tokens(text: str, tok=BYTES) -> int:
    return len(tok.encode(text)) + (tok.bos_id is not None) + 1


def take(stream, n):
    return [stream.next()["tokens"] for _ in range(n)]


def documents(flat: np.ndarray, tok=BYTES) -> list[str]:
    """The complete documents of a token stream that starts at a document start.

    Checks the packing format: each document is [BOS] ids EOS, BOS/EOS nowhere else.
    """
    out = []
    for piece in np.split(flat, np.flatnonzero(flat == tok.eos_id) + 1)[:-1]:
        if tok.bos_id is not None:
            assert piece[0] == tok.bos_id, piece
            piece = piece[1:]
        assert tok.eos_id not in piece[:-1] and tok.bos_id not in piece
        out.append(tok.decode(piece[:-1]))
    return out


def row_documents(source, seed, row, n_docs, window, tok=BYTES) -> list[str]:
    """The first ``n_docs`` documents of row ``row`` of the train batches."""
    stream = source.train_stream(seed, rows=[row])
    flat, docs = [], []
    while len(docs) < n_docs:
        flat.append(stream.next()["tokens"].ravel())
        docs = documents(np.concatenate(flat), tok)
    return docs[:n_docs]


def test_batches_and_epochs_per_row(data_dir):
    source = TfdsSource(make_config(data_dir), vocab_size=258)
    batch = source.train_stream(0).next()
    assert batch["tokens"].shape == (4, 16) and batch["tokens"].dtype == np.int32
    assert (batch["tokens"][:, 0] == BYTES.bos_id).all()
    # Row r reads documents r, r+4, r+8, ... of the split (in its stored order): each once
    # per epoch, reshuffled every epoch.
    stored = stored_texts(data_dir, "train")
    shares = []
    for row in range(4):
        share = stored[row::4]
        order = row_documents(source, 0, row, 2 * len(share), 16)
        first, second = order[: len(share)], order[len(share) :]
        assert sorted(first) == sorted(share) == sorted(second) and first != second
        assert row_documents(source, 1, row, len(share), 16) != first
        shares.append(set(first))
    assert set().union(*shares) == set(TRAIN_DOCS)
    assert row_documents(source, 0, 2, 5, 16) == row_documents(source, 0, 2, 5, 16)


def test_row_is_exactly_its_concatenated_documents(data_dir):
    """No token is lost or repeated between windows: a row's flat stream is its packed docs."""
    source = TfdsSource(make_config(data_dir, seq_len=6), vocab_size=258)
    flat = np.concatenate([b["tokens"][1] for b in take_batches(source.train_stream(5), 40)])
    packed = np.concatenate(
        [[BYTES.bos_id, *BYTES.encode(d), BYTES.eos_id] for d in documents(flat)]
    )
    np.testing.assert_array_equal(flat[: len(packed)], packed)


def stored_texts(data_dir, split: str) -> list[str]:
    records = tfds.data_source("stability_test_text", split=split, data_dir=str(data_dir))
    return [r["text"].decode() for r in records]


def take_batches(stream, n):
    return [stream.next() for _ in range(n)]


def test_some_rows_are_those_rows_of_the_global_batch(data_dir):
    """What a process holding rows 1 and 3 reads, fresh and resumed from the gathered state."""
    source = TfdsSource(make_config(data_dir), vocab_size=258)
    full, part = source.train_stream(3), source.train_stream(3, rows=[1, 3])
    for _ in range(6):
        np.testing.assert_array_equal(part.next()["tokens"], full.next()["tokens"][[1, 3]])
    state = json.loads(json.dumps(full.state()))
    resumed = source.train_stream(3, rows=[3, 1])
    resumed.restore(state)
    for _ in range(6):
        np.testing.assert_array_equal(resumed.next()["tokens"], full.next()["tokens"][[3, 1]])


@pytest.mark.parametrize("done", [0, 1, 3, 12])
def test_restore_continues_exactly(data_dir, done):
    source = TfdsSource(make_config(data_dir), vocab_size=258)
    stream = source.train_stream(2)
    take(stream, done)
    state = json.loads(json.dumps(stream.state()))
    expected = take(stream, 20)  # crosses at least one epoch boundary
    fresh = source.train_stream(2)
    fresh.restore(state)
    advanced = source.train_stream(2)
    take(advanced, 7)
    advanced.restore(state)
    for resumed in (fresh, advanced):
        for want, got in zip(expected, take(resumed, 20), strict=True):
            np.testing.assert_array_equal(got, want)


def test_read_ahead_gives_the_batches_of_one_document_at_a_time(data_dir, sp_model):
    """Batched reads, read-ahead and tokenizer threads change nothing in the batches or the
    states (which a checkpoint stores)."""
    cfg = make_config(data_dir, tokenizer="sentencepiece", tokenizer_path=sp_model)
    source = TfdsSource(cfg, vocab_size=96)
    streams = [
        RowStreams(source._train, source._documents_tokens, 5, range(4), 4, 16, ahead, threads)
        for ahead, threads in ((1, 1), (16, 1), (5, 2))
    ]
    for _ in range(25):  # several epochs of the 41 documents
        batches = [s.next()["tokens"] for s in streams]
        states = [s.state() for s in streams]
        for b, st in zip(batches[1:], states[1:], strict=True):
            np.testing.assert_array_equal(b, batches[0])
            assert st == states[0]


def test_eval_batches_and_bits_per_byte(data_dir):
    source = TfdsSource(make_config(data_dir), vocab_size=258)
    evals = source.eval_batches(80)  # more tokens than the split holds: it cycles
    assert len(evals) == 80 and all(b["tokens"].shape == (4, 16) for b in evals)
    flat = np.concatenate([b["tokens"].ravel() for b in evals])
    docs = documents(flat)
    assert docs[: len(EVAL_DOCS)] == docs[len(EVAL_DOCS) : 2 * len(EVAL_DOCS)]
    assert sorted(docs[: len(EVAL_DOCS)]) == sorted(EVAL_DOCS)
    np.testing.assert_array_equal(source.eval_batches(2)[1]["tokens"], evals[1]["tokens"])
    n_bytes = sum(len(d.encode("utf-8")) for d in EVAL_DOCS)
    n_tokens = sum(doc_tokens(d) for d in EVAL_DOCS)
    assert source.description["eval_bytes_per_token"] == pytest.approx(n_bytes / n_tokens)
    assert bits_per_byte(3 * math.log(2), 1.5) == pytest.approx(2.0)


def test_sentencepiece_documents(data_dir, sp_model):
    cfg = make_config(data_dir, tokenizer="sentencepiece", tokenizer_path=sp_model)
    source = TfdsSource(cfg, vocab_size=96)
    tok = source.tokenizer
    batch = source.train_stream(0).next()["tokens"]
    assert ((batch >= 0) & (batch < 96)).all()
    share = stored_texts(data_dir, "train")[1::4]
    docs = row_documents(source, 0, 1, len(share), 16, tok)
    assert sorted(docs) == sorted(share)  # SentencePiece round-trips every document


def test_sentencepiece_without_bos(data_dir, tmp_path):
    path = train_sentencepiece(tmp_path, TRAIN_DOCS + EVAL_DOCS, bos_id=-1)
    cfg = make_config(data_dir, tokenizer="sentencepiece", tokenizer_path=path)
    source = TfdsSource(cfg, vocab_size=96)
    assert source.tokenizer.bos_id is None  # documents are separated by EOS alone
    share = stored_texts(data_dir, "train")[2::4]
    docs = row_documents(source, 0, 2, len(share), 16, source.tokenizer)
    assert sorted(docs) == sorted(share)


def test_mock_data(tmp_path):
    cfg = make_config(tmp_path, tfds_name="lm1b", tfds_eval_split="test")
    with tfds.testing.mock_data(num_examples=9):
        source = TfdsSource(cfg, vocab_size=258)
        flat = np.concatenate([b[0] for b in take(source.train_stream(0), 30)])
        evals = source.eval_batches(2)
    assert flat[0] == BYTES.bos_id and len(documents(flat)) >= 9 // 4
    assert evals[0]["tokens"].shape == (4, 16)


def test_bad_inputs(data_dir, sp_model, tmp_path):
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    damaged = tmp_path / "damaged"
    shutil.copytree(data_dir, damaged)
    for shard in damaged.glob("*/*/*-train.array_record-*"):
        shard.unlink()
    cases = [
        (dict(tfds_data_dir=""), {}, "config.data.tfds_data_dir=''"),
        (dict(tfds_data_dir=str(tmp_path / "missing")), {}, "config.data.tfds_data_dir="),
        # the directory is named before a vocabulary too small for the tokenizer
        (dict(tfds_data_dir=str(tmp_path / "missing")), dict(vocab_size=256), "tfds_data_dir="),
        (dict(tfds_name=""), {}, "config.data.tfds_name=''"),
        (dict(tfds_name="no_such_dataset_xyz"), {}, "config.data.tfds_name='no_such_dataset_xyz'"),
        (dict(tfds_name="lm1b", tfds_data_dir=str(empty_dir)), {}, "not prepared"),
        (dict(tfds_data_dir=str(damaged)), {}, "config.data.tfds_data_dir=.*cannot read"),
        (dict(tfds_split="test"), {}, "config.data.tfds_split='test'.*valid splits: train"),
        (dict(tfds_split="train[:0]"), {}, "config.data.tfds_split='train\\[:0\\]'"),
        (dict(tfds_eval_split="nope"), {}, "config.data.tfds_eval_split='nope'"),
        (dict(tfds_text_feature="content"), {}, "config.data.tfds_text_feature='content'"),
        (dict(tokenizer="words"), {}, "config.data.tokenizer='words'"),
        (dict(tokenizer="sentencepiece"), {}, "config.data.tokenizer_path=''"),
        (
            dict(tokenizer="sentencepiece", tokenizer_path=str(tmp_path / "x.model")),
            {},
            "config.data.tokenizer_path=.*does not exist",
        ),
        (
            dict(tokenizer="sentencepiece", tokenizer_path=str(garbage)),
            {},
            "config.data.tokenizer_path=.*not a SentencePiece model",
        ),
        (dict(), dict(vocab_size=256), "config.model.vocab_size=256 .* 258 tokens"),
        (
            dict(tokenizer="sentencepiece", tokenizer_path=sp_model),
            dict(vocab_size=64),
            "config.model.vocab_size=64 .* 96 tokens",
        ),
        # A batch row without a document of its own: 41 train documents, 64 rows.
        (dict(batch_size=64), {}, "config.data.tfds_split='train' .* yields 41 documents"),
        (dict(tfds_eval_split="validation[:0]"), {}, "tfds_eval_split='validation\\[:0\\]'"),
    ]
    for overrides, kwargs, message in cases:
        kwargs = dict(vocab_size=258) | kwargs
        with pytest.raises(ConfigError, match=message) as err:
            TfdsSource(make_config(data_dir, **overrides), **kwargs)
        assert "\n" not in str(err.value), str(err.value)
