"""Parse and check one safetensors header without reading any tensor bytes.

We parse the header ourselves (8-byte little-endian length, then JSON) rather
than through safe_open so that planning never maps the data, and so that every
malformed header gets an error naming the file and tensor instead of a panic.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

from ..dtypes import SAFETENSORS_DTYPES, itemsize
from ..errors import UserError

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # absolute path of the shard
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict]:
    """Tensors of one safetensors file and its __metadata__; UserError on anything malformed."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) < 8:
            raise UserError(f"{path}: truncated safetensors file ({size} bytes, no header); re-download or re-save it")
        (n,) = struct.unpack("<Q", raw_len)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise UserError(
                f"{path}: header length {n} is absurd for a {size}-byte file; the file is corrupt or not safetensors"
            )
        blob = fh.read(n)
    try:
        header = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: header is not valid JSON ({exc.__class__.__name__}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, data_len)
    _check_layout(path, tensors.values(), data_start, data_len)
    return tensors, metadata if isinstance(metadata, dict) else {}


def _tensor_info(path: str, name: str, entry, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise UserError(f"{path}: tensor {name!r} has a malformed header entry; the file is corrupt")
    dtype = entry.get("dtype")
    if dtype not in SAFETENSORS_DTYPES:
        raise UserError(
            f"{path}: tensor {name!r} has unknown dtype {dtype!r}; the file is corrupt or from a newer safetensors"
        )
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise UserError(f"{path}: tensor {name!r} has an invalid shape {shape!r}; the file is corrupt")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise UserError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}; the file is corrupt")
    begin, end = offsets
    expected = math.prod(shape) * itemsize(SAFETENSORS_DTYPES[dtype])
    if begin < 0 or end < begin or end - begin != expected:
        raise UserError(
            f"{path}: tensor {name!r} spans bytes {begin}..{end} but its shape {shape} and dtype {dtype} need {expected}; the file is corrupt"
        )
    if end > data_len:
        raise UserError(
            f"{path}: tensor {name!r} ends at byte {end} past the end of the data ({data_len} bytes); the file is truncated"
        )
    return TensorInfo(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_layout(path: str, infos, data_start: int, data_len: int) -> None:
    """Tensors must tile the data section in order, as the safetensors format requires:
    no overlap, no gap, nothing after the last tensor."""
    cursor, prev = data_start, None
    for info in sorted(infos, key=lambda t: (t.start, t.end)):
        if prev is not None and info.start < prev.end:
            raise UserError(f"{path}: tensors {prev.name!r} and {info.name!r} overlap in the file; the file is corrupt")
        if info.start != cursor:
            raise UserError(
                f"{path}: tensor {info.name!r} starts at data byte {info.start - data_start} but the previous "
                f"tensor ends at {cursor - data_start} (offsets out of order or with a gap); the file is corrupt"
            )
        cursor, prev = info.end, info
    if cursor != data_start + data_len:
        raise UserError(
            f"{path}: {data_start + data_len - cursor} stray bytes after the last tensor; the file is corrupt"
        )
