import json
import math
import shutil
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds

from stability.config import ConfigError
from stability.data.tfds import ByteTokenizer, TfdsSource, bits_per_byte

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


def epoch_documents(stream, n_docs, rows, window, tok=BYTES) -> list[str]:
    """The first ``n_docs`` documents of a train ``stream`` of ``rows x window`` batches."""
    epochs = math.ceil(n_docs / len(TRAIN_DOCS))
    n_tokens = epochs * sum(doc_tokens(d, tok) for d in TRAIN_DOCS)
    flat = np.concatenate([b.ravel() for b in take(stream, n_tokens // (rows * window) + 1)])
    docs = documents(flat, tok)[:n_docs]
    assert len(docs) == n_docs
    return docs


def test_batches_and_epoch(data_dir):
    source = TfdsSource(make_config(data_dir), vocab_size=258, process_index=0, process_count=1)
    batch = source.train_stream(0).next()
    assert batch["tokens"].shape == (4, 16) and batch["tokens"].dtype == np.int32
    assert batch["tokens"][0, 0] == BYTES.bos_id
    # One epoch: every document exactly once, in a shuffled order; the next epoch reshuffles.
    order = epoch_documents(source.train_stream(0), 2 * len(TRAIN_DOCS), 4, 16)
    first, second = order[: len(TRAIN_DOCS)], order[len(TRAIN_DOCS) :]
    assert sorted(first) == sorted(TRAIN_DOCS) == sorted(second)
    assert first != second
    other_seed = epoch_documents(source.train_stream(1), len(TRAIN_DOCS), 4, 16)
    assert first != other_seed
    assert epoch_documents(source.train_stream(0), len(TRAIN_DOCS), 4, 16) == first


def test_stream_is_exactly_the_concatenated_documents(data_dir):
    """No token is lost or repeated between windows: the flat stream is the packed docs."""
    source = TfdsSource(make_config(data_dir, seq_len=6), vocab_size=258, process_count=1)
    flat = np.concatenate([b.ravel() for b in take(source.train_stream(5), 40)])
    packed = np.concatenate(
        [[BYTES.bos_id, *BYTES.encode(d), BYTES.eos_id] for d in documents(flat)]
    )
    np.testing.assert_array_equal(flat[: len(packed)], packed)


def test_process_shards_are_disjoint_and_cover(data_dir):
    cfg = make_config(data_dir)
    shards = []
    for p in range(2):
        source = TfdsSource(cfg, vocab_size=258, process_index=p, process_count=2)
        stream = source.train_stream(0)
        assert stream.next()["tokens"].shape == (2, 16)  # local batch = batch_size / 2
        n_docs = len(range(p, len(TRAIN_DOCS), 2))
        docs = epoch_documents(source.train_stream(0), n_docs, 2, 16)
        assert len(set(docs)) == n_docs
        shards.append(set(docs))
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(TRAIN_DOCS)


@pytest.mark.parametrize("done", [0, 1, 3, 12])
def test_restore_continues_exactly(data_dir, done):
    source = TfdsSource(make_config(data_dir), vocab_size=258, process_count=1)
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


def test_eval_batches_and_bits_per_byte(data_dir):
    source = TfdsSource(make_config(data_dir), vocab_size=258, process_count=1)
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
    source = TfdsSource(cfg, vocab_size=96, process_count=1)
    tok = source.tokenizer
    batch = source.train_stream(0).next()["tokens"]
    assert ((batch >= 0) & (batch < 96)).all()
    docs = epoch_documents(source.train_stream(0), len(TRAIN_DOCS), 4, 16, tok)
    assert sorted(docs) == sorted(TRAIN_DOCS)  # SentencePiece round-trips every document


def test_sentencepiece_without_bos(data_dir, tmp_path):
    path = train_sentencepiece(tmp_path, TRAIN_DOCS + EVAL_DOCS, bos_id=-1)
    cfg = make_config(data_dir, tokenizer="sentencepiece", tokenizer_path=path)
    source = TfdsSource(cfg, vocab_size=96, process_count=1)
    assert source.tokenizer.bos_id is None  # documents are separated by EOS alone
    docs = epoch_documents(source.train_stream(0), len(TRAIN_DOCS), 4, 16, source.tokenizer)
    assert sorted(docs) == sorted(TRAIN_DOCS)


def test_mock_data(tmp_path):
    cfg = make_config(tmp_path, tfds_name="lm1b", tfds_eval_split="test")
    with tfds.testing.mock_data(num_examples=9):
        source = TfdsSource(cfg, vocab_size=258, process_count=1)
        flat = np.concatenate([b.ravel() for b in take(source.train_stream(0), 30)])
        evals = source.eval_batches(2)
    assert flat[0] == BYTES.bos_id and len(documents(flat)) >= 9
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
        # A shard that yields no documents: 16 processes, 12 eval documents.
        (
            dict(batch_size=16),
            dict(process_index=15, process_count=16),
            "config.data.tfds_eval_split='validation' .* yields 12 documents",
        ),
        (dict(batch_size=3), dict(process_count=2), "config.data.batch_size=3"),
    ]
    for overrides, kwargs, message in cases:
        kwargs = dict(vocab_size=258, process_count=1) | kwargs
        with pytest.raises(ConfigError, match=message) as err:
            TfdsSource(make_config(data_dir, **overrides), **kwargs)
        assert "\n" not in str(err.value), str(err.value)
