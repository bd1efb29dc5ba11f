"""Unit tests of corpus windows: consecutive non-overlapping cuts with BOS, and the seeded sample."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import UserError
from pipeline.load.corpus import make_windows, sample_windows

BOS = 999


@pytest.mark.parametrize(("n_tokens", "max_len"), [(100, 8), (99, 10), (27, 10), (9, 10), (50, 3)])
def test_windows_have_max_len_tokens_bos_first_and_consecutive_non_overlapping_bodies(n_tokens, max_len):
    ids = np.arange(n_tokens) + 1000  # every token distinct, so cuts can be located exactly
    out = make_windows(ids, max_len, BOS)
    width = max_len - 1
    assert out.dtype == np.int32
    assert out.shape == (n_tokens // width, max_len)
    assert (out[:, 0] == BOS).all()
    for w in range(out.shape[0]):
        assert out[w, 1:].tolist() == ids[w * width:(w + 1) * width].tolist()
    # Non-overlapping and consecutive: the bodies joined are the start of the corpus, no token twice.
    joined = out[:, 1:].reshape(-1)
    assert joined.tolist() == ids[:len(joined)].tolist()


def test_the_tail_that_does_not_fill_a_window_is_dropped():
    ids = np.arange(1, 24)  # 23 tokens, windows of 7 + BOS: 3 windows, 2 tokens left over
    out = make_windows(ids, 8, BOS)
    assert out.shape[0] == 3
    used = set(out[:, 1:].reshape(-1).tolist())
    assert used == set(range(1, 22))
    assert not {22, 23} & used


def test_a_corpus_shorter_than_one_window_gives_no_windows():
    out = make_windows(np.arange(5), 8, BOS)
    assert out.shape == (0, 8)


def test_windows_accept_a_plain_list_of_token_ids():
    ids = list(range(1, 13))
    assert np.array_equal(make_windows(ids, 4, BOS), make_windows(np.asarray(ids), 4, BOS))


def test_sampled_windows_are_distinct_sorted_in_range_and_as_many_as_asked():
    idx = sample_windows(500, 64, seed=7, corpus="c")
    assert len(idx) == 64
    assert len(set(idx.tolist())) == 64
    assert (np.diff(idx) > 0).all()
    assert idx.min() >= 0 and idx.max() < 500


def test_sampling_is_reproducible_for_a_seed_and_differs_between_seeds():
    a = sample_windows(1000, 50, seed=1234, corpus="c")
    b = sample_windows(1000, 50, seed=1234, corpus="c")
    c = sample_windows(1000, 50, seed=1235, corpus="c")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sampling_draws_with_numpy_default_rng_of_the_seed_without_replacement():
    expected = np.sort(np.random.default_rng(42).choice(300, size=20, replace=False))
    assert np.array_equal(sample_windows(300, 20, seed=42, corpus="c"), expected)


def test_asking_for_every_window_returns_all_of_them_in_corpus_order():
    assert sample_windows(12, 12, seed=3, corpus="c").tolist() == list(range(12))


def test_asking_for_more_passages_than_windows_names_max_passages_and_what_is_allowed():
    with pytest.raises(UserError) as info:
        sample_windows(10, 11, seed=0, corpus="python-docs")
    message = str(info.value)
    assert "max_passages is 11" in message
    assert "'python-docs' has only 10 windows" in message
    assert "allowed: 1..10" in message


def test_python_docs_documents_are_its_topics_and_start_where_each_topic_does():
    from pydoc_data.topics import topics

    from pipeline.load.corpus import load_corpus

    corpus = load_corpus("python-docs")
    keys = sorted(topics)
    assert len(corpus.doc_starts) == len(keys) and corpus.doc_starts[0] == 0
    for key, start in zip(keys, corpus.doc_starts, strict=True):
        assert corpus.text[start:].startswith(topics[key].strip("\n")[:50])


def test_bytes_tokens_know_the_character_they_belong_to():
    from pipeline.load.tokenizer import ByteTokenizer

    ids, starts = ByteTokenizer().encode_with_starts("aé b")
    assert ids == list("aé b".encode()) and starts == [0, 1, 1, 2, 3]
