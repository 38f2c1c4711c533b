"""A parallel reader that streams tensor bytes from safetensors shards to their devices.

Why our own and not safe_open(device="cuda") or `.to("cuda")`: those read one tensor at a time on one thread
through pageable memory. Here several threads `preadv` chunks into a bounded pool of pinned staging slots
(host memory bounded by `staging_bytes`, whatever the model's size), each copied asynchronously to its place
on a side stream; tensors to cast or quantize land in temporaries on the target device (at most `temp_bytes`
in flight). Measurements: docs/design.md, "Loading", and docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..checkpoint.header import TensorInfo
from ..dtypes import SAFETENSORS_DTYPES
from ..errors import UserError
from ..startup.reader import warm


@dataclass
class Item:
    info: TensorInfo
    device: torch.device
    final_in_place: bool  # the landing buffer is the final tensor (same dtype, no quantization)
    futures: list[Future] = field(default_factory=list)
    landing: torch.Tensor | None = None

    def typed(self) -> torch.Tensor:
        """The landed bytes viewed as the checkpoint's dtype and shape."""
        dtype = SAFETENSORS_DTYPES[self.info.dtype]
        return self.landing.view(dtype).view(self.info.shape)


class _Slots:
    """Pinned staging buffers; each remembers the CUDA event of the copy that last read it."""

    def __init__(self, count: int, nbytes: int):
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put((torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), None))

    def take(self):
        slot, event = self._free.get()
        if event is not None:
            event.synchronize()
        return slot

    def give(self, slot, event) -> None:
        self._free.put((slot, event))


@dataclass(frozen=True)
class ReaderShape:
    threads: int
    chunk: int
    staging: int


def machine_defaults(threads: int | None = None, chunk: int | None = None, staging: int | None = None) -> ReaderShape:
    """Reader threads, chunk bytes and pinned pool from this machine where not given.

    Three threads for every four cores, at most 12, 16 MiB chunks, two pinned chunks per
    thread, never more than 1/64 of the machine's memory pinned. Measured on the 16-core
    H200 host (bench/h2d_limit.py): 12 x 16 MiB reached 87% of the raw pread->pinned->H2D
    limit, 16 threads 79%, 8 threads 65%; 4 MiB chunks were slower at every count.
    """
    threads = int(threads) if threads else max(2, min(12, (os.cpu_count() or 8) * 3 // 4))
    chunk = int(chunk) if chunk else 16 * 2**20
    if not staging:
        staging = 2 * threads * chunk
        with contextlib.suppress(ValueError, OSError):
            staging = min(staging, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 64)
    return ReaderShape(max(1, threads), max(4096, chunk), max(chunk, int(staging)))


class ShardStreamer:
    def __init__(
        self,
        threads: int | None = None,
        chunk_bytes: int | None = None,
        staging_bytes: int | None = None,
        temp_bytes: int = 2**30,
        readahead: bool = True,
    ):
        """threads / chunk_bytes / staging_bytes None (or 0): chosen from the machine (machine_defaults)."""
        self.readahead = readahead
        shape = machine_defaults(threads, chunk_bytes, staging_bytes)
        self.threads, self.chunk, self.staging = shape.threads, shape.chunk, shape.staging
        self.temp_bytes = int(temp_bytes)
        self._fds: dict[str, int] = {}
        self._streams = threading.local()
        self._slots: _Slots | None = None

    def run(
        self, items: list[Item], finish: Callable[[Item], None], on_bytes: Callable[[int], None] | None = None
    ) -> None:
        """Read every item (in file order), calling `finish(item)` once its bytes have landed."""
        items = sorted(items, key=lambda it: (it.info.file, it.info.start))
        if any(it.device.type == "cuda" for it in items):
            reserve_device_memory(landing_bytes(items, self.temp_bytes))
            self._slots = _Slots(max(2, self.staging // self.chunk), self.chunk)
        pending: deque[Item] = deque()
        temp_in_flight = 0
        # The workers' parallel chunk reads arrive out of order; on a cold page cache that defeats
        # the disk's sequential read-ahead (measured: 18.4 s against 8.0 s for one sequential
        # reader), so one more reader reads each cold shard front to back ahead of them (none
        # for a shard the run's early read-ahead already took). Decided before any worker
        # starts, from a few sampled pages per shard: a check running beside the workers slowed
        # warm loads by a third on the H100 host (0.85 s -> 1.13 s).
        if self.readahead:
            warm(list(dict.fromkeys(it.info.file for it in items)))
        collecting = gc.isenabled()
        gc.disable()  # a full collection over a 7B skeleton's objects would stall every reader on the GIL
        try:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="load_shards") as pool:
                for item in items:
                    size = 0 if item.final_in_place else item.info.nbytes
                    while pending and temp_in_flight + size > self.temp_bytes:
                        temp_in_flight -= self._finish(pending.popleft(), finish)
                    self._submit(pool, item, on_bytes)
                    pending.append(item)
                    temp_in_flight += size
                while pending:
                    self._finish(pending.popleft(), finish)
        finally:
            if collecting:
                gc.enable()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._slots = None

    def _submit(self, pool, item: Item, on_bytes) -> None:
        info = item.info
        item.landing = torch.empty(info.nbytes, dtype=torch.uint8, device=item.device)
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        for off in range(0, info.nbytes, self.chunk):
            n = min(self.chunk, info.nbytes - off)
            item.futures.append(pool.submit(self._read_chunk, fd, info, item.landing, off, n, on_bytes))

    def _finish(self, item: Item, finish) -> int:
        for fut in item.futures:
            event = fut.result()
            if event is not None:
                torch.cuda.current_stream(item.device).wait_event(event)
        item.futures.clear()
        finish(item)
        size = 0 if item.final_in_place else item.info.nbytes
        item.landing = None
        return size

    def _read_chunk(self, fd: int, info: TensorInfo, dest: torch.Tensor, off: int, n: int, on_bytes):
        if dest.device.type == "cpu":
            _pread_into(fd, dest[off : off + n], info.start + off, info)
            event = None
        else:
            slot = self._slots.take()
            try:
                _pread_into(fd, slot[:n], info.start + off, info)
                stream = self._stream(dest.device)  # this thread's current stream on that device
                dest[off : off + n].copy_(slot[:n], non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            except BaseException:
                self._slots.give(slot, None)
                raise
            self._slots.give(slot, event)
        if on_bytes is not None:
            on_bytes(n)
        return event

    def _stream(self, device: torch.device):
        streams = getattr(self._streams, "by_device", None)
        if streams is None:
            streams = self._streams.by_device = {}
        if device not in streams:
            # Made current once per worker thread (torch's current stream is per thread): no
            # stream context switch per chunk, which cost readers time on the GIL at 12+ threads.
            streams[device] = torch.cuda.Stream(device)
            torch.cuda.set_stream(streams[device])
        return streams[device]


def landing_bytes(items: list[Item], temp_bytes: int) -> dict[torch.device, int]:
    """Device bytes the landing buffers will take per GPU: every final tensor, and of the
    temporaries (cast or quantized later) at most `temp_bytes` at a time."""
    final: dict[torch.device, int] = {}
    temp: dict[torch.device, int] = {}
    for it in items:
        if it.device.type == "cuda":
            into = final if it.final_in_place else temp
            into[it.device] = into.get(it.device, 0) + it.info.nbytes
    return {d: final.get(d, 0) + min(temp.get(d, 0), temp_bytes) for d in {*final, *temp}}


def reserve_device_memory(needs: dict[torch.device, int], headroom: int = 2**30) -> None:
    """One allocation per GPU for what the landing buffers will take, freed at once: torch's
    caching allocator keeps the segment and serves every later tensor from it, instead of one
    cudaMalloc per tensor while the readers copy (transformers' `caching_allocator_warmup` does
    the same for from_pretrained). Memory the cache already holds unused counts against it;
    skipped where it would not leave `headroom` free. Changes no tensor and no placement."""
    for device, nbytes in needs.items():
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        want = nbytes - unused
        if want <= max(unused, 64 * 2**20):
            continue  # the cache can serve much of it already, or too little to matter
        free, _ = torch.cuda.mem_get_info(device)
        if want > free - headroom:
            continue
        with contextlib.suppress(torch.OutOfMemoryError):
            block = torch.empty(want, dtype=torch.uint8, device=device)
            del block


def _pread_into(fd: int, buf: torch.Tensor, offset: int, info: TensorInfo) -> None:
    pread_exact(fd, memoryview(buf.numpy()).cast("B"), offset, info)


def pread_exact(fd: int, view: memoryview, offset: int, info: TensorInfo) -> None:
    """Fill `view` from `offset`; a short read means the shard is truncated (one-line UserError)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise UserError(f"{info.file}: tensor {info.name!r} ends past the end of the file; the file is truncated")
        done += got
