"""Each rank's exact plan: the local shard of every sharded tensor (shape, bytes), its byte ranges, and the caps.

Built from the single-process plan (planning.build_plan with every tensor on the
rank's device) and the model's own tensor-parallel plan (styles.py). A rank's
predicted bytes are its shards (int8 sized on the shard: one byte per element plus a
scale per local row) plus the tensors every rank keeps whole (norms, rowwise biases,
buffers); its read bytes are the slices it reads plus those whole tensors. All of it
comes from headers: a dry run plans every rank in one process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..dtypes import SAFETENSORS_DTYPES, itemsize
from ..errors import UserError
from ..hf.tensor_parallel import check_heads, model_plan, packing, shard_dim
from ..planning import Plan, TensorPlan
from ..planning.device_map import check_caps
from ..planning.slices import TensorSlice, piece_bytes, rank_slice, slice_pieces
from ..quant.sizes import quantized_nbytes
from ..quant.spec import QuantSpec
from ..sizes import Caps, MaxMemory, format_bytes
from .spec import ParallelSpec


@dataclass(frozen=True)
class RankPlan:
    rank: int
    device: str
    plan: Plan
    read_bytes: int  # checkpoint bytes this rank reads: its slices, and the tensors it keeps whole

    @property
    def predicted_bytes(self) -> int:
        return sum(self.plan.predicted_bytes.values())

    def to_json(self) -> dict:
        tensors = self.plan.tensors.values()
        return {
            "rank": self.rank,
            "device": self.device,
            "predicted_bytes": self.predicted_bytes,
            "read_bytes": self.read_bytes,
            "sharded_tensors": sum(1 for t in tensors if t.slice is not None and not t.tied_to),
            "whole_tensors": sum(1 for t in tensors if t.slice is None and not t.tied_to),
            "tensors": {n: t.to_json() for n, t in sorted(self.plan.tensors.items())},
        }


def shard_plans(
    model, plan: Plan, checkpoint, parallel: ParallelSpec, spec: QuantSpec, max_memory: MaxMemory
) -> list[RankPlan]:
    """The plan of every rank; exit 2 when the world size cuts a sharded dim or an attention head."""
    world = parallel.world_size
    styles = model_plan(model)
    dims = _sharded_dims(plan, styles)
    _check_divisible(plan, dims, world)
    check_heads(model, styles, world)
    out = []
    for rank in range(world):
        device = parallel.device_of(rank)
        caps = rank_caps(max_memory, device)
        tensors = _rank_tensors(plan, dims, rank, world, device, spec, checkpoint.tensors)
        rank_plan = replace(plan, tensors=tensors, device_map={"": device}, max_memory=dict(caps))
        check_caps(rank_plan.predicted_bytes, caps)
        out.append(RankPlan(rank, device, rank_plan, _read_bytes(tensors, checkpoint)))
    return out


def _sharded_dims(plan: Plan, styles: dict[str, str]) -> dict[str, tuple[str, int]]:
    """Planned tensor name -> (style, dim) for every sharded parameter; tied members must agree with their head."""
    dims: dict[str, tuple[str, int]] = {}
    for t in plan.tensors.values():
        style = styles.get(t.name) if t.kind == "param" else None
        dim = shard_dim(style, t.name.rpartition(".")[2], len(t.shape)) if style else None
        if dim is not None:
            dims[t.name] = (style, dim)
    for t in plan.tensors.values():
        if t.tied_to and dims.get(t.name, (None, None))[1] != dims.get(t.tied_to, (None, None))[1]:
            raise UserError(
                f"parallel=tensor: tied weights {t.tied_to} and {t.name} are sharded differently by the model's "
                "tensor-parallel plan; load it with parallel=none"
            )
    return dims


def _check_divisible(plan: Plan, dims, world: int) -> None:
    for name, (style, dim) in dims.items():
        t = plan.tensors[name]
        if t.tied_to:
            continue
        blocks = packing(style)
        if t.shape[dim] % (world * blocks):
            sizes = [plan.tensors[n].shape[d] // packing(s) for n, (s, d) in dims.items()]
            fits = [w for w in range(1, math.gcd(*sizes) + 1) if math.gcd(*sizes) % w == 0]
            packed = f", in {blocks} packed blocks of {t.shape[dim] // blocks}" if blocks > 1 else ""
            raise UserError(
                f"parallel.world_size={world} does not divide {name} dim {dim} ({t.shape[dim]}{packed}); "
                f"choose a world size that divides every sharded dim, e.g. {', '.join(map(str, fits[1:4] or [1]))}"
            )


def _rank_tensors(
    plan: Plan, dims, rank: int, world: int, device: str, spec: QuantSpec, infos
) -> dict[str, TensorPlan]:
    slices: dict[str, TensorSlice] = {}
    out: dict[str, TensorPlan] = {}
    for name, t in plan.tensors.items():
        if name in dims and not t.tied_to:
            style, dim = dims[name]
            sl = slices[name] = rank_slice(t.shape, dim, rank, world, style, packing(style))
            nbytes = quantized_nbytes(sl.shape, spec) if t.quantized else math.prod(sl.shape) * itemsize(t.dtype)
            conversion = t.conversion and replace(
                t.conversion, shape=sl.shape, pieces=slice_pieces(t.conversion.pieces, sl, infos)
            )
            out[name] = replace(t, shape=sl.shape, nbytes=nbytes, device=device, slice=sl, conversion=conversion)
        else:
            out[name] = replace(t, device=device)
    for name, t in out.items():  # tied members share their head's shard
        head = slices.get(t.tied_to) if t.tied_to else None
        if head is not None:
            out[name] = replace(t, shape=head.shape, slice=head)
    return out


def _read_bytes(tensors: dict[str, TensorPlan], checkpoint) -> int:
    """The bytes a rank reads: its slices (of converted tensors: each piece's source range) and whole tensors."""
    total = 0
    whole: set[str] = set()  # sources read whole, once (an unsharded converted tensor's sources)
    for t in tensors.values():
        if t.conversion is not None and t.tied_to:
            continue  # assembled once, for the head (loading/assemble.py skips the members too)
        if t.conversion is not None and t.slice is not None:
            total += sum(piece_bytes(checkpoint.tensors[p.source], p) for p in t.conversion.pieces)
        elif t.conversion is not None:
            whole.update(t.conversion.sources)
        elif t.source:
            info = checkpoint.tensors[t.source]
            total += t.slice.nbytes(itemsize(SAFETENSORS_DTYPES[info.dtype])) if t.slice is not None else info.nbytes
    return total + sum(checkpoint.tensors[k].nbytes for k in whole)


def rank_caps(max_memory: MaxMemory, device: str) -> Caps:
    """The cap of a rank's own device (each rank holds only its shards there); none when not sized (or auto)."""
    size = max_memory.sizes.get(device)
    return Caps() if size is None else Caps.of({device: size})


def plan_table(ranks: list[RankPlan]) -> str:
    """One line per rank: what the log and the dry run print."""
    rows = [("rank", "device", "predicted", "reads", "sharded", "whole")]
    for r in ranks:
        doc = r.to_json()
        rows.append(
            (
                str(r.rank),
                r.device,
                format_bytes(r.predicted_bytes),
                format_bytes(r.read_bytes),
                str(doc["sharded_tensors"]),
                str(doc["whole_tensors"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
