"""Packing rows' scored positions into unembedding calls (pipeline.engine.segments), on random shapes."""

from __future__ import annotations

import random

import pytest
import torch

from pipeline.engine.segments import Packer, cuts


@pytest.mark.parametrize("seed", range(20))
def test_every_piece_once_in_order_and_no_call_over_the_limit(seed):
    rng = random.Random(seed)
    s_len, limit = rng.randint(1, 40), rng.randint(1, 50)
    starts = [rng.randint(0, s_len) for _ in range(rng.randint(0, 9))]  # s_len: a row with nothing to score
    pieces = [(i, s0, s1) for i, start in enumerate(starts) for s0, s1 in cuts(start, s_len, limit)]
    assert [(i, s) for i, s0, s1 in pieces for s in range(s0, s1)] == [
        (i, s) for i, start in enumerate(starts) for s in range(start, s_len)]
    for together in (True, False):
        packer = Packer(limit, together)
        groups = [g for piece in pieces for g in packer.add(piece, torch.zeros(piece[2] - piece[1], 2))]
        groups += packer.flush()
        assert [meta for group in groups for meta, _ in group] == pieces
        assert all(group and sum(rows.shape[0] for _, rows in group) <= limit for group in groups)
        if not together:
            assert all(len(group) == 1 for group in groups)
        else:  # greedy: a group closed only because the next piece did not fit
            for group, following in zip(groups, groups[1:], strict=False):
                assert sum(rows.shape[0] for _, rows in group) + following[0][1].shape[0] > limit


def test_the_groups_depend_on_the_pieces_not_on_when_they_come():
    pieces = [("a", 3), ("b", 4), ("c", 2), ("d", 5), ("e", 1)]
    one_by_one, packer = [], Packer(7)
    for meta, n in pieces:
        one_by_one += packer.add(meta, torch.zeros(n, 1))
    one_by_one += packer.flush()
    assert [[meta for meta, _ in group] for group in one_by_one] == [["a", "b"], ["c", "d"], ["e"]]


def test_cuts_are_where_the_engine_always_cut():
    assert list(cuts(2, 9, 3)) == [(2, 5), (5, 8), (8, 9)]
    assert list(cuts(9, 9, 3)) == []


def test_bad_limits_and_pieces_are_refused():
    with pytest.raises(ValueError, match="limit must be >= 1"):
        Packer(0)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        list(cuts(0, 3, 0))
    with pytest.raises(ValueError, match="exceeds the limit of 2"):
        Packer(2).add("x", torch.zeros(3, 1))
