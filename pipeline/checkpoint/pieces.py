"""Where each checkpoint tensor lands inside a converted model tensor, as views (no bytes touched).

transformers' conversion ops (MergeModulelist, Concatenate, Chunk, Split, Transpose) are view relations
between a source and the target, interpreted here on shapes alone, so the loader can preallocate the target
and copy each source into its region as it arrives; any other op is refused by name (docs/design.md, "Key
conversions").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..errors import UserError

# A view step: ("select", dim, index) | ("narrow", dim, start, length) | ("transpose", dim0, dim1)
Step = tuple


@dataclass(frozen=True)
class Piece:
    source: str  # checkpoint key
    into: tuple[Step, ...] = ()  # steps from the target tensor to the region this source fills
    take: tuple[Step, ...] = ()  # steps from the source tensor to the part that goes there
    read: tuple[tuple[int, int, int], ...] | None = None  # tensor parallel: (dim, start, stop) per dim cut: all read


@dataclass(frozen=True)
class Virtual:
    """A tensor of the conversion in progress: its shape and which sources make it up."""

    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]


def view(tensor: torch.Tensor, steps) -> torch.Tensor:
    for step in steps:
        if step[0] == "select":
            tensor = tensor.select(step[1], step[2])
        elif step[0] == "narrow":
            tensor = tensor.narrow(step[1], step[2], step[3])
        else:
            tensor = tensor.transpose(step[1], step[2])
    return tensor


def _dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def stack(parts: list[Virtual], dim: int) -> Virtual:
    shape = parts[0].shape
    if any(p.shape != shape for p in parts):
        raise ValueError(f"cannot stack shapes {[list(p.shape) for p in parts]}")
    d = _dim(dim, len(shape) + 1)
    pieces = tuple(replace(q, into=(("select", d, i), *q.into)) for i, p in enumerate(parts) for q in p.pieces)
    return Virtual(shape[:d] + (len(parts),) + shape[d:], pieces)


def concatenate(parts: list[Virtual], dim: int) -> Virtual:
    d = _dim(dim, len(parts[0].shape))
    rest = [p.shape[:d] + p.shape[d + 1 :] for p in parts]
    if any(r != rest[0] for r in rest):
        raise ValueError(f"cannot concatenate shapes {[list(p.shape) for p in parts]} on dim {dim}")
    pieces, offset = [], 0
    for p in parts:
        size = p.shape[d]
        pieces += [replace(q, into=(("narrow", d, offset, size), *q.into)) for q in p.pieces]
        offset += size
    return Virtual(parts[0].shape[:d] + (offset,) + parts[0].shape[d + 1 :], tuple(pieces))


def narrow(part: Virtual, dim: int, start: int, length: int) -> Virtual:
    """A slice of a tensor made of one whole source (what Chunk and Split act on in transformers' mappings)."""
    if len(part.pieces) != 1 or part.pieces[0].into:
        raise ValueError("slicing a tensor assembled from several sources")
    d = _dim(dim, len(part.shape))
    q = part.pieces[0]
    shape = part.shape[:d] + (length,) + part.shape[d + 1 :]
    return Virtual(shape, (replace(q, take=(*q.take, ("narrow", d, start, length))),))


def transpose(part: Virtual, dim0: int, dim1: int) -> Virtual:
    d0, d1 = _dim(dim0, len(part.shape)), _dim(dim1, len(part.shape))
    shape = list(part.shape)
    shape[d0], shape[d1] = shape[d1], shape[d0]
    return Virtual(tuple(shape), tuple(replace(q, into=(("transpose", d0, d1), *q.into)) for q in part.pieces))


def chunk_bounds(size: int, chunks: int) -> list[tuple[int, int]]:
    """(start, length) of each piece torch.chunk makes (it may make fewer than asked)."""
    step = math.ceil(size / chunks) if chunks else size
    return [(s, min(step, size - s)) for s in range(0, size, max(step, 1))]


def split_bounds(sizes: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for n in sizes:
        out.append((start, n))
        start += n
    return out


def unsupported(op, target: str, supported) -> UserError:
    return UserError(
        f"checkpoint: transformers builds {target!r} with {type(op).__name__}, a conversion the loader does not "
        f"interpret (it does {', '.join(sorted(supported))}); load this checkpoint with transformers' "
        f"from_pretrained, or re-save it with model.save_pretrained after loading it there"
    )
