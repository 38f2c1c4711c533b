"""One rank's slice of a checkpoint tensor, and the byte ranges of the file that hold it (headers only).

A tensor sharded over `world` ranks along `dim` gives rank r the index range
[r*n/world, (r+1)*n/world) of that dim. In a row-major file that is one contiguous
run of bytes for dim 0 (colwise: a block of rows), and one run per index of the
dims before `dim` otherwise (rowwise: a segment of every row). Nothing else of the
tensor is read. Packed styles (transformers' packed_colwise: fused gate/up, one
_StridedShard with split_factor 2) cut each of the `packed` equal blocks of the dim
the same way and lay the rank's parts side by side. A converted tensor (fused from
several checkpoint tensors, checkpoint/pieces.py) is sliced per source: each source
piece that the rank's ranges meet is read as one box of that source (a range per dim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..checkpoint.pieces import Piece
from ..dtypes import SAFETENSORS_DTYPES, itemsize


@dataclass(frozen=True)
class TensorSlice:
    dim: int  # the sharded dimension (non-negative)
    start: int  # first index of this rank along `dim`
    stop: int  # one past the last
    full_shape: tuple[int, ...]  # the unsharded tensor's shape
    style: str  # the model's tensor-parallel style that asked for it (colwise, rowwise, embedding_rowwise...)
    packed: int = 1  # blocks of `dim` cut alike (packed styles' split_factor); start/stop are within a block

    @property
    def shape(self) -> tuple[int, ...]:
        """The local shard's shape."""
        local = self.packed * (self.stop - self.start)
        return self.full_shape[: self.dim] + (local,) + self.full_shape[self.dim + 1 :]

    def ranges(self) -> list[tuple[int, int, int]]:
        """(first, end, local first) along `dim` of every run of indices this rank holds, in the full tensor."""
        block = self.full_shape[self.dim] // self.packed
        n = self.stop - self.start
        return [(b * block + self.start, b * block + self.stop, b * n) for b in range(self.packed)]

    def byte_ranges(self, offset: int, itemsize: int) -> list[tuple[int, int]]:
        """(file offset, length) of every run of bytes that holds this slice of a tensor stored at `offset`."""
        shape = self.full_shape
        inner = math.prod(shape[self.dim + 1 :]) * itemsize  # bytes of one index along `dim`
        outer = math.prod(shape[: self.dim])
        step = shape[self.dim] * inner
        runs = [(lo * inner, (hi - lo) * inner) for lo, hi, _ in self.ranges() if hi > lo]
        return [(offset + o * step + at, length) for o in range(outer) for at, length in runs]

    def nbytes(self, itemsize: int) -> int:
        return math.prod(self.shape) * itemsize

    def to_json(self) -> dict:
        out = {"style": self.style, "dim": self.dim, "start": self.start, "stop": self.stop}
        return out | ({"packed": self.packed} if self.packed > 1 else {})


def rank_slice(full_shape, dim: int, rank: int, world: int, style: str, packed: int = 1) -> TensorSlice:
    """Rank `rank`'s even share of `full_shape` along `dim`, per packed block (the caller checked divisibility)."""
    shape = tuple(full_shape)
    dim = dim % len(shape)
    n = shape[dim] // packed // world
    return TensorSlice(dim, rank * n, (rank + 1) * n, shape, style, packed)


@dataclass(frozen=True)
class Box:
    """A box of a checkpoint tensor (a range per dim): what a rank reads of one source of a converted tensor."""

    full_shape: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]  # [start, stop) per dim

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.ranges)

    def nbytes(self, itemsize: int) -> int:
        return math.prod(self.shape) * itemsize

    def byte_ranges(self, offset: int, itemsize: int) -> list[tuple[int, int]]:
        """One run per index of the dims before the last one the box cuts; one run in all when it cuts none."""
        full = self.full_shape
        cut = [d for d, (a, b) in enumerate(self.ranges) if (a, b) != (0, full[d])]
        k = cut[-1] if cut else -1
        inner = math.prod(full[k + 1 :]) * itemsize
        if k < 0:
            return [(offset, inner)] if inner else []
        a_k, b_k = self.ranges[k]
        strides = [math.prod(full[d + 1 :]) * itemsize for d in range(k)]
        starts = [offset + a_k * inner]
        for d in reversed(range(k)):
            a, b = self.ranges[d]
            starts = [s + i * strides[d] for i in range(a, b) for s in starts]
        return sorted((s, (b_k - a_k) * inner) for s in starts) if b_k > a_k else []


def source_slice(piece: Piece, info) -> Box:
    """The part of a piece's checkpoint tensor that a rank reads: its `read` ranges, the rest of each dim whole."""
    shape = tuple(info.shape)
    ranges = [(0, n) for n in shape]
    for dim, start, stop in piece.read or ():
        ranges[dim] = (start, stop)
    return Box(shape, tuple(ranges))


def piece_bytes(info, piece: Piece) -> int:
    """Checkpoint bytes a rank reads for one piece."""
    return source_slice(piece, info).nbytes(itemsize(SAFETENSORS_DTYPES[info.dtype]))


def slice_pieces(pieces: tuple[Piece, ...], sl: TensorSlice, infos) -> tuple[Piece, ...]:
    """A converted target's pieces for this rank's shard: regions in the shard, and the source range to read.

    Each piece fills `view(target, into)` from `view(source, take)`. Walking `into` follows the
    sharded dim into the piece's region and keeps only the rank's indices there (a piece the
    rank's ranges miss is dropped; one they meet twice becomes two); walking `take` backwards
    finds the same indices in the source; with the narrows of `take` (Chunk, Split) they become the
    piece's `read`, one (dim, start, stop) per dim the rank does not read whole (`infos`: checkpoint
    key -> header entry, for the sources' shapes).
    The returned pieces address the rank's local shard and the part that was read.
    """
    out: list[Piece] = []
    for piece in pieces:
        for into, dim, lo, hi in _into_shard(piece.into, sl):
            out.append(_read_part(piece, into, dim, lo, hi, tuple(infos[piece.source].shape)))
    return tuple(out)


def _into_shard(steps, sl: TensorSlice):
    """(steps in the local shard, the sharded dim in the region or None, its range there) per run the piece meets."""
    branches = [((), sl.dim, lo, hi, local) for lo, hi, local in sl.ranges()]
    for step in steps:
        nxt = []
        for into, dim, lo, hi, local in branches:
            if dim is None or step[1] != dim and step[0] != "transpose":
                shift = step[0] == "select" and dim is not None and step[1] < dim
                nxt.append(((*into, step), dim - 1 if shift else dim, lo, hi, local))
            elif step[0] == "transpose":
                a, b = step[1], step[2]
                nxt.append(((*into, step), b if dim == a else a if dim == b else dim, lo, hi, local))
            elif step[0] == "select":  # the sharded dim picks one index: the region is whole, or not this rank's
                if lo <= step[2] < hi:
                    nxt.append(((*into, ("select", dim, local + step[2] - lo)), None, 0, 0, 0))
            else:  # narrow on the sharded dim: keep the overlap, re-based on the region
                first, length = step[2], step[3]
                a, b = max(lo, first), min(hi, first + length)
                if a < b:
                    nxt.append(((*into, ("narrow", dim, local + a - lo, b - a)), dim, a - first, b - first, 0))
        branches = nxt
    out = []
    for into, dim, lo, hi, local in branches:
        if dim is not None:  # the region's run sits at `local` in the shard's region
            into = (*into, ("narrow", dim, local, hi - lo))
        out.append((into, dim, lo, hi))
    return out


def _read_part(piece: Piece, into, dim, lo: int, hi: int, source_shape) -> Piece:
    """The source box behind region indices [lo, hi) of `dim`: every narrow of `take` folded into what is read."""
    box = [[0, n] for n in source_shape]
    dims = list(range(len(source_shape)))  # view dim -> source dim, as `take` is walked
    take = []
    for step in piece.take:
        if step[0] == "narrow":
            d = dims[step[1]]
            box[d] = [box[d][0] + step[2], box[d][0] + step[2] + step[3]]
            continue  # done by the read itself
        if step[0] == "transpose":
            dims[step[1]], dims[step[2]] = dims[step[2]], dims[step[1]]
            take.append(step)
        else:  # select: read that one index, and select it from the part read
            d = dims.pop(step[1])
            box[d] = [box[d][0] + step[2], box[d][0] + step[2] + 1]
            take.append(("select", step[1], 0))
    if dim is not None:
        d = dims[dim]
        box[d] = [box[d][0] + lo, box[d][0] + hi]
    read = tuple((d, a, b) for d, (a, b) in enumerate(box) if (a, b) != (0, source_shape[d]))
    return replace(piece, into=into, take=tuple(take), read=read)
