"""Read one rank's slice of a tensor straight from its safetensors shard: only the slice's bytes.

The byte ranges come from the header (planning/slices.py); each run is read with
os.preadv into its place in one host buffer, so a rank never holds (or reads) the
full tensor. Cast and quantization then act on the shard (loading/assign.py).
"""

from __future__ import annotations

import os

import torch

from ..checkpoint.header import TensorInfo
from ..dtypes import SAFETENSORS_DTYPES, itemsize
from ..planning.slices import TensorSlice
from .streamer import pread_exact


class SliceReader:
    """Keeps one descriptor per shard open while a rank reads its slices; counts the bytes read."""

    def __init__(self):
        self._fds: dict[str, int] = {}
        self.bytes_read = 0

    def read(self, info: TensorInfo, sl: TensorSlice) -> torch.Tensor:
        dtype = SAFETENSORS_DTYPES[info.dtype]
        size = itemsize(dtype)
        buf = torch.empty(sl.nbytes(size), dtype=torch.uint8)
        view = memoryview(buf.numpy()).cast("B")
        fd = self._fd(info.file)
        at = 0
        for offset, length in sl.byte_ranges(info.start, size):
            pread_exact(fd, view[at : at + length], offset, info)
            at += length
        self.bytes_read += at
        return buf.view(dtype).view(sl.shape)

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
