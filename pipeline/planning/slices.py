"""One rank's slice of a checkpoint tensor, and the byte ranges of the file that hold it (headers only).

A tensor sharded over `world` ranks along `dim` gives rank r the index range
[r*n/world, (r+1)*n/world) of that dim. In a row-major file that is one contiguous
run of bytes for dim 0 (colwise: a block of rows), and one run per index of the
dims before `dim` otherwise (rowwise: a segment of every row). Nothing else of the
tensor is read. A fused tensor built from several sources is sliced per source
the same way (a slice of a concatenation is a slice of each part).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSlice:
    dim: int  # the sharded dimension (non-negative)
    start: int  # first index of this rank along `dim`
    stop: int  # one past the last
    full_shape: tuple[int, ...]  # the unsharded tensor's shape
    style: str  # the model's tensor-parallel style that asked for it (colwise, rowwise, embedding_rowwise...)

    @property
    def shape(self) -> tuple[int, ...]:
        """The local shard's shape."""
        return self.full_shape[: self.dim] + (self.stop - self.start,) + self.full_shape[self.dim + 1 :]

    def byte_ranges(self, offset: int, itemsize: int) -> list[tuple[int, int]]:
        """(file offset, length) of every run of bytes that holds this slice of a tensor stored at `offset`."""
        shape = self.full_shape
        inner = math.prod(shape[self.dim + 1 :]) * itemsize  # bytes of one index along `dim`
        outer = math.prod(shape[: self.dim])
        run = (self.stop - self.start) * inner
        step = shape[self.dim] * inner
        return [(offset + o * step + self.start * inner, run) for o in range(outer)] if run else []

    def nbytes(self, itemsize: int) -> int:
        return math.prod(self.shape) * itemsize

    def to_json(self) -> dict:
        return {"style": self.style, "dim": self.dim, "start": self.start, "stop": self.stop}


def rank_slice(full_shape, dim: int, rank: int, world: int, style: str) -> TensorSlice:
    """Rank `rank`'s even share of `full_shape` along `dim` (the caller checked that world divides it)."""
    shape = tuple(full_shape)
    dim = dim % len(shape)
    n = shape[dim] // world
    return TensorSlice(dim, rank * n, (rank + 1) * n, shape, style)


def source_slices(target: TensorSlice, sizes: list[int], *, packed: bool) -> list[tuple[int, TensorSlice]]:
    """A rank's slice of a target fused from sources concatenated along `target.dim`, as slices of each source.

    `sizes` are the sources' lengths along that dim (their other dims equal the target's). Packed
    styles (transformers' packed_colwise: fused gate/up) give each rank its share of every source;
    a plain slice of the concatenation covers sub-ranges of the sources it overlaps. Either way each
    source is read as a contiguous range of its own dim: only this rank's bytes of every source.
    """
    world = target.full_shape[target.dim] // (target.stop - target.start) if target.stop > target.start else 1
    rank = target.start // max(target.stop - target.start, 1)
    out: list[tuple[int, TensorSlice]] = []
    at = 0
    for i, n in enumerate(sizes):
        shape = target.full_shape[: target.dim] + (n,) + target.full_shape[target.dim + 1 :]
        if packed:
            out.append((i, rank_slice(shape, target.dim, rank, world, target.style)))
        else:
            lo, hi = max(target.start, at) - at, min(target.stop, at + n) - at
            if lo < hi:
                out.append((i, TensorSlice(target.dim, lo, hi, shape, target.style)))
        at += n
    return out
