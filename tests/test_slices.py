"""Slice reads from real safetensors files: exactly a rank's part of the tensor, and only its bytes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pipeline.checkpoint import open_checkpoint
from pipeline.checkpoint import pieces as P
from pipeline.loading.slices import SliceReader
from pipeline.planning.slices import rank_slice


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "dim"), [((12, 10), 0), ((12, 10), 1), ((3, 8, 6), 1), ((3, 8, 6), 2), ((8,), 0)])
def test_each_rank_reads_its_slice_and_nothing_else(shape, dim, dtype, tmp_path):
    full = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.float32).reshape(shape).to(dtype)
    save_file({"before": torch.ones(5), "w": full, "after": torch.zeros(3)}, tmp_path / "model.safetensors")
    info = open_checkpoint(str(tmp_path / "model.safetensors")).tensors["w"]
    world = 2
    with SliceReader() as reader:
        parts = []
        for rank in range(world):
            sl = rank_slice(shape, dim, rank, world, "colwise")
            part = reader.read(info, sl)
            assert torch.equal(part, full.chunk(world, dim)[rank]) and part.shape == sl.shape
            parts.append(part)
        assert reader.bytes_read == info.nbytes  # two halves: the tensor once, no neighbour's byte
    assert torch.equal(torch.cat(parts, dim), full)


def test_byte_ranges_are_one_run_for_rows_and_one_per_row_for_columns():
    rows = rank_slice((4, 6), 0, 1, 2, "colwise").byte_ranges(100, 4)
    cols = rank_slice((4, 6), 1, 1, 2, "rowwise").byte_ranges(100, 4)
    assert rows == [(100 + 2 * 24, 48)]
    assert cols == [(100 + r * 24 + 12, 12) for r in range(4)]


def _assemble(virtual, sources: dict[str, torch.Tensor]) -> torch.Tensor:
    """The whole converted tensor, as the loader assembles it (every piece into its region)."""
    first = next(iter(sources.values()))
    target = torch.empty(virtual.shape, dtype=first.dtype)
    for piece in virtual.pieces:
        P.view(target, piece.into).copy_(P.view(sources[piece.source], piece.take))
    return target


def _rank_shard(virtual, sources, sl) -> tuple[torch.Tensor, int]:
    """This rank's shard built from slice_pieces: only each piece's `read` range of its source is touched."""
    from pipeline.planning.slices import slice_pieces

    local = torch.full(sl.shape, float("nan"))
    read = 0
    for piece in slice_pieces(virtual.pieces, sl, sources):  # the tensors stand in for header entries (.shape)
        src = sources[piece.source]
        for dim, start, stop in piece.read or ():
            src = src.narrow(dim, start, stop - start)
        read += src.numel()
        P.view(local, piece.into).copy_(P.view(src, piece.take))
    return local, read


def _leaf(name: str, t: torch.Tensor) -> P.Virtual:
    return P.Virtual(tuple(t.shape), (P.Piece(name),))


def _experts(n: int = 3, inter: int = 4, hidden: int = 6):
    """Mixtral's per-expert w1/w3 (inter x hidden) and w2 (hidden x inter), distinct values everywhere."""
    src = {}
    for e in range(n):
        for w, shape in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
            src[f"{e}.{w}"] = torch.randn(shape)
    return src


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fused_experts_shards_are_read_from_each_sources_range(world):
    """gate_up = cat(stack(w1), stack(w3), dim 1) packed over the ranks; down = stack(w2) rowwise."""
    torch.manual_seed(0)
    src = _experts()
    n = 3
    gate = P.stack([_leaf(f"{e}.w1", src[f"{e}.w1"]) for e in range(n)], 0)
    up = P.stack([_leaf(f"{e}.w3", src[f"{e}.w3"]) for e in range(n)], 0)
    gate_up = P.concatenate([gate, up], 1)
    down = P.stack([_leaf(f"{e}.w2", src[f"{e}.w2"]) for e in range(n)], 0)
    full_gu, full_down = _assemble(gate_up, src), _assemble(down, src)
    read_total = 0
    for rank in range(world):
        sl = rank_slice(full_gu.shape, 1, rank, world, "packed_colwise", packed=2)
        local, read = _rank_shard(gate_up, src, sl)
        g, u = full_gu.chunk(2, dim=1)
        assert torch.equal(local, torch.cat([g.chunk(world, 1)[rank], u.chunk(world, 1)[rank]], 1))
        read_total += read
        sl = rank_slice(full_down.shape, 2, rank, world, "rowwise")
        local, read = _rank_shard(down, src, sl)
        assert torch.equal(local, full_down.chunk(world, 2)[rank])
        read_total += read
    assert read_total == sum(t.numel() for t in src.values())  # every source element read once over the ranks


def test_slices_through_chunks_and_transposes():
    """A fused qkv source chunked into three targets, and a transposed source: each rank reads its own range."""
    torch.manual_seed(0)
    qkv = torch.randn(12, 6)
    parts = [P.narrow(_leaf("qkv", qkv), 0, s, n) for s, n in P.chunk_bounds(12, 3)]
    conv = P.transpose(_leaf("conv", torch.randn(6, 8)), 0, 1)  # GPT-2's Conv1D: (in, out) -> (out, in)
    sources = {"qkv": qkv, "conv": torch.randn(6, 8)}
    for virtual in (*parts, conv):
        full = _assemble(virtual, sources)
        for dim in range(2):
            for rank in range(2):
                sl = rank_slice(full.shape, dim, rank, 2, "colwise")
                local, read = _rank_shard(virtual, sources, sl)
                assert torch.equal(local, full.chunk(2, dim)[rank])
                assert read == full.numel() // 2  # only this rank's half of the part that goes there


def test_a_box_is_read_as_one_run_per_index_before_its_last_cut_dim(tmp_path):
    from pipeline.planning.slices import Box

    full = torch.arange(4 * 6 * 5, dtype=torch.float32).reshape(4, 6, 5)
    save_file({"a": torch.ones(3), "w": full}, tmp_path / "model.safetensors")
    info = open_checkpoint(str(tmp_path / "model.safetensors")).tensors["w"]
    for ranges in (
        ((1, 3), (2, 5), (0, 5)),
        ((0, 4), (0, 6), (1, 4)),
        ((0, 4), (0, 6), (0, 5)),
        ((2, 3), (0, 6), (0, 5)),
    ):
        box = Box(full.shape, ranges)
        with SliceReader() as reader:
            got = reader.read(info, box)
            assert reader.bytes_read == box.nbytes(4)
        assert torch.equal(got, full[tuple(slice(a, b) for a, b in ranges)])
    assert len(Box(full.shape, ((1, 3), (2, 5), (0, 5))).byte_ranges(0, 4)) == 2  # rows 2..4 of each: contiguous


def test_a_packed_slice_is_one_run_per_block():
    sl = rank_slice((8, 3), 0, 1, 2, "packed_colwise", packed=2)
    assert sl.shape == (4, 3) and sl.ranges() == [(2, 4, 0), (6, 8, 2)]
    assert sl.byte_ranges(0, 4) == [(2 * 12, 24), (6 * 12, 24)]
