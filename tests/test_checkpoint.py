"""Header and index parsing on real safetensors files, and every malformed case a user can hit."""

import json
import struct

import pytest
import torch
from helpers import rewrite_header
from safetensors.torch import save_file

from pipeline.checkpoint import open_checkpoint
from pipeline.checkpoint.header import read_header
from pipeline.errors import UserError


@pytest.fixture
def st_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}, path)
    return path


def test_reads_headers_without_loading(st_file):
    tensors, _ = read_header(str(st_file))
    assert tensors["a"].shape == (2, 3) and tensors["a"].dtype == "F32" and tensors["a"].nbytes == 24
    assert tensors["b"].dtype == "BF16" and tensors["b"].nbytes == 8
    with open(st_file, "rb") as fh:  # offsets point at the right bytes
        fh.seek(tensors["a"].start)
        assert torch.frombuffer(bytearray(fh.read(24)), dtype=torch.float32).tolist() == [0, 1, 2, 3, 4, 5]


def test_single_file_checkpoint(st_file):
    ck = open_checkpoint(str(st_file))
    assert ck.files == [str(st_file)] and ck.bytes == 32 and set(ck.tensors) == {"a", "b"}


def test_truncated_file(st_file):
    st_file.write_bytes(st_file.read_bytes()[:-4])
    with pytest.raises(UserError, match=r"model.safetensors: tensor '.' ends at byte .* past the end"):
        read_header(str(st_file))


def test_file_shorter_than_header_length(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(UserError, match="truncated"):
        read_header(str(p))


def test_absurd_header_length(st_file):
    raw = st_file.read_bytes()
    st_file.write_bytes(struct.pack("<Q", 2**40) + raw[8:])
    with pytest.raises(UserError, match="header length 1099511627776 is absurd"):
        read_header(str(st_file))


def test_header_not_json(st_file):
    raw = st_file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    st_file.write_bytes(raw[:8] + b"{" + b"x" * (n - 1) + raw[8 + n :])
    with pytest.raises(UserError, match="not valid JSON"):
        read_header(str(st_file))


def test_unknown_dtype(st_file):
    rewrite_header(st_file, lambda h: h["a"].update(dtype="F7"))
    with pytest.raises(UserError, match="tensor 'a' has unknown dtype 'F7'"):
        read_header(str(st_file))


def test_overlapping_offsets(st_file):
    def overlap(h):
        h["b"]["data_offsets"] = [16, 24]

    rewrite_header(st_file, overlap)
    with pytest.raises(UserError, match="overlap"):
        read_header(str(st_file))


def test_offsets_not_matching_shape(st_file):
    rewrite_header(st_file, lambda h: h["a"].update(shape=[3, 3]))
    with pytest.raises(UserError, match="tensor 'a' spans bytes"):
        read_header(str(st_file))


def _sharded(tmp_path):
    root = tmp_path / "ck"
    root.mkdir()
    save_file({"x": torch.zeros(2)}, root / "model-00001-of-00002.safetensors")
    save_file({"y": torch.zeros(3)}, root / "model-00002-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"},
    }
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root, index


def test_sharded_index(tmp_path):
    root, _ = _sharded(tmp_path)
    ck = open_checkpoint(str(root))
    assert len(ck.files) == 2 and ck.tensors["y"].shape == (3,)


def test_index_names_missing_shard(tmp_path):
    root, _ = _sharded(tmp_path)
    (root / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="names shard 'model-00002-of-00002.safetensors' which does not exist"):
        open_checkpoint(str(root))


@pytest.mark.parametrize("entry", ["/etc/passwd", "../outside.safetensors", "sub/../../x.safetensors"])
def test_index_entries_may_not_leave_the_checkpoint(tmp_path, entry):
    root, index = _sharded(tmp_path)
    index["weight_map"]["x"] = entry
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="(absolute path|leaves the checkpoint directory)"):
        open_checkpoint(str(root))


def test_index_lists_tensor_the_shard_lacks(tmp_path):
    root, index = _sharded(tmp_path)
    index["weight_map"]["z"] = "model-00001-of-00002.safetensors"
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        UserError, match="tensor 'z' is listed for 'model-00001-of-00002.safetensors' but that shard does not hold it"
    ):
        open_checkpoint(str(root))


def test_missing_path_and_pickle_only_dirs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="pytorch_model.bin: a pickle checkpoint.*checkpoint.allow_pickle=true"):
        open_checkpoint(str(tmp_path))
