"""Slice reads from real safetensors files: exactly a rank's part of the tensor, and only its bytes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pipeline.checkpoint import open_checkpoint
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


def test_a_fused_targets_slice_is_a_slice_of_each_source():
    """gate and up (4 rows each) fused along dim 0: packed gives each rank its share of both; plain ranges split."""
    from pipeline.planning.slices import source_slices

    gate, up = torch.arange(8.0).reshape(4, 2), 100 + torch.arange(8.0).reshape(4, 2)
    fused = torch.cat([gate, up])
    for rank in range(2):
        target = rank_slice(fused.shape, 0, rank, 2, "packed_colwise")
        packed = source_slices(target, [4, 4], packed=True)
        local = torch.cat([(gate, up)[i][s.start : s.stop] for i, s in packed])
        assert torch.equal(local, torch.cat([gate.chunk(2)[rank], up.chunk(2)[rank]]))  # _StridedShard(sf=2)
        plain = source_slices(target, [4, 4], packed=False)
        local = torch.cat([(gate, up)[i][s.start : s.stop] for i, s in plain])
        assert torch.equal(local, fused.chunk(2)[rank])
    uneven = source_slices(rank_slice((6, 2), 0, 0, 2, "colwise"), [2, 4], packed=False)
    assert [(i, s.start, s.stop) for i, s in uneven] == [(0, 0, 2), (1, 0, 1)]
