"""Which scored positions of which rows share one unembedding call.

The unembedding is a [positions x d_model] @ [d_model x vocab] product; its cost per position falls as more
positions share a call (the 50,257 x 768 weight is packed and streamed once per call: 18% less time per position
at 1,008 positions a call than at 126 on this repo's CPU), so the engine packs the positions of several rows into
one call, up to a limit that bounds the [positions x vocab] buffer. A piece is one row's positions s0..s1-1
(scored positions, t = s + 1) that go through one call together.

A matrix product's rounding can depend on its shape, so which pieces share a call is decided by the sequence of
pieces alone (`Packer`), not by how the caller batched its forward passes: the same rows in the same order give
the same calls, and so the same bits.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from torch import Tensor

Meta = TypeVar("Meta")


def cuts(start: int, s_len: int, limit: int) -> Iterator[tuple[int, int]]:
    """Scored positions start..s_len-1 in pieces (s0, s1) of at most `limit` positions, cut at start + k * limit."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    for s0 in range(start, s_len, limit):
        yield s0, min(s0 + limit, s_len)


class Packer(Generic[Meta]):
    """Pieces (the caller's metadata, and the [n x d_model] rows to unembed), in the order added, handed back in
    groups of at most `limit` rows: a group closes when the next piece would not fit (or, with together=False,
    after every piece). `add` returns the groups it closed, `flush` the open one."""

    def __init__(self, limit: int, together: bool = True):
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit, self.together = limit, together
        self.open: list[tuple[Meta, Tensor]] = []
        self.size = 0

    def add(self, meta: Meta, rows: Tensor) -> list[list[tuple[Meta, Tensor]]]:
        n = rows.shape[0]
        if n > self.limit:
            raise ValueError(f"a piece of {n} rows exceeds the limit of {self.limit}")
        closed = self.flush() if self.open and self.size + n > self.limit else []
        self.open.append((meta, rows))
        self.size += n
        if not self.together:
            closed += self.flush()
        return closed

    def flush(self) -> list[list[tuple[Meta, Tensor]]]:
        group, self.open, self.size = self.open, [], 0
        return [group] if group else []
