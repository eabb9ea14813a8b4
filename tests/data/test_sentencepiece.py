import numpy as np
import pytest

from stability.config import ConfigError
from stability.data.sentencepiece_tokenizer import SentencePieceTokenizer

from . import generated_documents, train_sentencepiece


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"), generated_documents(200, seed=0))


def test_round_trip(model_path):
    tok = SentencePieceTokenizer(model_path)
    held_out = generated_documents(50, seed=1)
    for text in held_out:
        ids = tok.encode(text)
        assert ids.dtype == np.int32
        assert ((ids >= 0) & (ids < tok.vocab_size)).all()
        assert tok.decode(ids) == text
        np.testing.assert_array_equal(tok.encode(text.encode("utf-8")), ids)
    assert tok.vocab_size == 96
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # SentencePiece defaults: unk 0, bos 1, eos 2


def test_model_without_bos(tmp_path):
    path = train_sentencepiece(tmp_path, generated_documents(200, seed=0), bos_id=-1)
    tok = SentencePieceTokenizer(path)
    assert tok.bos_id is None and tok.eos_id >= 0


def test_bad_files(tmp_path):
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a sentencepiece model")
    no_eos = train_sentencepiece(tmp_path, generated_documents(200, seed=0), eos_id=-1)
    for path, why in [
        ("", "empty"),
        (str(tmp_path / "missing.model"), "does not exist"),
        (str(garbage), "is not a SentencePiece model"),
        (no_eos, "no EOS"),
    ]:
        with pytest.raises(ConfigError, match=f"config.data.tokenizer_path=.*{why}") as err:
            SentencePieceTokenizer(path)
        assert "\n" not in str(err.value)
