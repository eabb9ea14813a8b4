import itertools
import types

import numpy as np
import pytest

from stability.config import ConfigError
from stability.data import backcopy
from stability.data.backcopy import BigramBackcopySource
from stability.data.synthetic import sample_chain, stationary


def make_config(**overrides):
    fields = dict(backcopy_vocab=64, backcopy_triggers=3, seq_len=64, batch_size=32)
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


@pytest.fixture(scope="module")
def source():
    return BigramBackcopySource(make_config(), vocab_size=65)


def test_shapes_and_bos(source):
    batch = source.train_stream(0).next()
    assert batch["tokens"].shape == (32, 65) and batch["tokens"].dtype == np.int32
    assert batch["mask_icl"].shape == batch["mask_markov"].shape == (32, 64)
    assert batch["mask_icl"].dtype == batch["mask_markov"].dtype == np.bool_
    tokens = batch["tokens"]
    assert (tokens[:, 0] == source.bos_id).all()
    assert ((tokens[:, 1:] >= 0) & (tokens[:, 1:] < 64)).all()  # BOS only at position 0


def test_copy_rule_and_masks(source):
    P = backcopy.zipf_bigram(64)
    for step in range(4):
        batch = source._batch(7, step)
        x = batch["tokens"]
        is_trigger = np.isin(x, source.triggers)
        assert not is_trigger[:, 1].any()  # the first symbol is never a trigger
        for b, t in zip(*np.nonzero(is_trigger[:, 1:-1]), strict=True):
            t += 1  # position of the trigger in x
            assert x[b, t + 1] == x[b, t - 1], (b, t)  # copies the token before the trigger
            assert not is_trigger[b, t - 1] and x[b, t - 1] != source.bos_id
        # Every non-copy transition after the first symbol has positive bigram probability.
        markov_prev, markov_next = x[:, 1:-1][~is_trigger[:, 1:-1]], x[:, 2:][~is_trigger[:, 1:-1]]
        assert (P[markov_prev, markov_next] > 0).all()
        # Masks: target j (= x[:, j+1]) is a copy iff x[:, j] is a trigger; they partition.
        np.testing.assert_array_equal(batch["mask_icl"], is_trigger[:, :-1])
        np.testing.assert_array_equal(batch["mask_markov"], ~batch["mask_icl"])
        assert batch["mask_icl"].any() and batch["mask_markov"].any()


def test_triggers_are_the_most_frequent_symbols(source):
    """Triggers are the most frequent symbols of the bigram chain itself (without copies)."""
    P = backcopy.zipf_bigram(64)
    rng = np.random.default_rng(0)
    tokens = sample_chain(P, np.full(64, 1 / 64), rng, (1024, 1024))[:, 64:]  # past burn-in
    counts = np.bincount(tokens.ravel(), minlength=64)
    assert set(np.argsort(-counts)[:3]) == set(source.triggers.tolist())


def test_deterministic_in_seed_and_step(source):
    a, b = source.train_stream(3), source.train_stream(3)
    first = [a.next() for _ in range(3)]
    for batch in first:
        for key, value in b.next().items():
            np.testing.assert_array_equal(value, batch[key])
    assert not np.array_equal(first[0]["tokens"], first[1]["tokens"])
    assert not np.array_equal(first[0]["tokens"], source.train_stream(4).next()["tokens"])
    resumed = source.train_stream(3)
    resumed.restore({"step": 2})
    np.testing.assert_array_equal(resumed.next()["tokens"], first[2]["tokens"])
    evals = source.eval_batches(2)
    np.testing.assert_array_equal(evals[1]["tokens"], source.eval_batches(2)[1]["tokens"])


def test_expected_losses_by_enumeration():
    """The exact floor equals brute force over every sequence of a 4-symbol chain."""
    V, T = 4, 5
    P = backcopy.zipf_bigram(V, seed=3)
    is_trigger = np.array([True, False, False, False])
    first = np.array([0.0, 0.5, 0.3, 0.2])
    row_h = backcopy._entropy(P)
    total = markov = mass = 0.0
    for seq in itertools.product(range(V), repeat=T):  # symbols x_1..x_T
        p, losses, flags = first[seq[0]], [backcopy._entropy(first)], [True]
        for j in range(1, T):
            prev = seq[j - 1]
            if is_trigger[prev]:
                p *= float(j >= 2 and seq[j] == seq[j - 2])
                losses.append(0.0)
                flags.append(False)
            else:
                p *= P[prev, seq[j]]
                losses.append(row_h[prev])
                flags.append(True)
        if p == 0:
            continue
        total += p * sum(losses) / T
        markov += p * sum(h for h, f in zip(losses, flags, strict=True) if f)
        mass += p * sum(flags)
    floor, markov_entropy, icl_fraction = backcopy.expected_losses(P, is_trigger, first, T)
    assert floor == pytest.approx(total, rel=1e-12)
    assert markov_entropy == pytest.approx(markov / mass, rel=1e-12)
    assert icl_fraction == pytest.approx(1 - mass / T, rel=1e-12)


def test_loss_floor_matches_samples(source):
    """The Bayes loss of sampled targets averages to loss_floor (Monte Carlo, 1%)."""
    P = backcopy.zipf_bigram(64)
    row_h = backcopy._entropy(P)
    first = np.where(np.isin(np.arange(64), source.triggers), 0, stationary(P))
    h_first = backcopy._entropy(first / first.sum())
    losses, markov = [], []
    for step in range(16):
        batch = source._batch(1, step)
        x, mask = batch["tokens"], batch["mask_markov"]
        h = np.where(mask[:, 1:], row_h[x[:, 1:-1]], 0.0)
        h = np.concatenate([np.full((len(x), 1), h_first), h], axis=1)
        losses.append(h.mean())
        markov.append(h.sum() / mask.sum())
    assert np.mean(losses) == pytest.approx(source.loss_floor, rel=0.01)
    assert np.mean(markov) == pytest.approx(source.description["markov_entropy"], rel=0.01)


@pytest.mark.parametrize(
    "overrides, vocab_size, field",
    [
        (dict(backcopy_vocab=1), 65, "config.data.backcopy_vocab=1"),
        (dict(), 64, "config.model.vocab_size=64"),
        (dict(backcopy_triggers=0), 65, "config.data.backcopy_triggers=0"),
        (dict(backcopy_triggers=64), 65, "config.data.backcopy_triggers=64"),
    ],
)
def test_bad_config(overrides, vocab_size, field):
    with pytest.raises(ConfigError, match=field) as err:
        BigramBackcopySource(make_config(**overrides), vocab_size)
    assert "\n" not in str(err.value)
