"""Getting cold shards into the page cache while the process does other things (imports, skeleton).

No torch here: the runner starts this before the model code is imported and the skeleton is
built, so the disk works while Python does (docs/design.md, "Reads overlapped with imports").

Why real reads and not `posix_fadvise(WILLNEED)` over large ranges: Linux serves one WILLNEED
call only up to max(read_ahead_kb, max_sectors_kb) of the device (a 64 MiB call read 8 MiB on
both our machines' disks, 1.25 MiB on a typical NVMe queue) and drops the rest silently, which
left the earlier prefetch reading almost nothing. One thread reads each shard front to back;
at normal priority in 64 MiB reads with the kernel's normal read-ahead: the fastest of the
settings measured on the 2-core machine's disk (1.9-2.0 GB/s cold; 4-16 MiB reads 0.5-1.9 GB/s,
FADV_SEQUENTIAL 0.55-0.88 GB/s) and the setting of the H200 host's "one sequential read"
reference. The bytes land in one reused buffer; nothing is kept but the cache.

Why at idle priority (`priority="idle"`, the default): while it reads, the process imports
transformers and the model code, whose thousands of small cold reads wait on the same disk; each
queued behind 64 MiB of read-ahead requests. So at idle the reader keeps one small request in
flight (4 MiB reads, the kernel's read-ahead off for that file) and asks for the idle I/O class
(Linux ioprio; honoured by mq-deadline and BFQ where they hold the queue); `hurry()` puts it back
to 64 MiB reads at normal priority once the load itself waits on the bytes. On the H200 host
(virtio disk, mq-deadline) the I/O class alone changed nothing (35.1 vs 34.9 s cold); the small
reads cut instantiate_empty from 19.6-21.3 s to 13.6-16.4 s and the cold bf16 7B run from
30.3 s to 26.3 s (docs/benchmarks.md), though the slower read then finished during the load.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import threading
import time

_BUFFER = 64 * 2**20
_GENTLE = 4 * 2**20  # the read size at idle priority: one disk request (max_sectors_kb is 1-4 MiB)
_lock = threading.Lock()
_claimed: dict[str, dict] = {}  # file -> {bytes, started, finished, priority}: what this process read ahead
_idle_readers: set[int] = set()  # native thread ids of readers still at idle I/O priority
PRIORITIES = ("idle", "normal")
_IOPRIO_CLASS = {"idle": 3, "normal": 0}  # IOPRIO_CLASS_IDLE; NONE = from the CPU nice level (best effort)
_SYS_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "riscv64": 30, "ppc64le": 273, "ppc64": 273, "s390x": 282}


def warm(paths: list[str], budget_fraction: float = 0.5, priority: str = "normal") -> threading.Thread | None:
    """Start one daemon thread reading, front to back, each of `paths` that is not yet in the page
    cache, at `priority` ("idle" or "normal" I/O class); files another warmer of this process
    already took, and files beyond `budget_fraction` of the available memory (they would push out
    what was read before them) are left alone. None when there is nothing to read."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority {priority!r}: one of {PRIORITIES}")
    budget = int(available_memory() * budget_fraction)
    cold: list[tuple[str, int]] = []
    with _lock:
        for path in paths:
            path = os.path.abspath(path)
            if path in _claimed:
                continue
            with contextlib.suppress(OSError):
                size = os.path.getsize(path)
                if size <= budget and resident_fraction(path) < 0.9:
                    cold.append((path, size))
                    budget -= size
        if not cold:
            return None
        started = time.perf_counter()
        for path, size in cold:
            _claimed[path] = {"bytes": size, "started": started, "priority": priority}
    files = [p for p, _ in cold]
    thread = threading.Thread(target=_read_all, args=(files, priority), name="page_cache", daemon=True)
    thread.start()
    return thread


def hurry() -> None:
    """Back to normal I/O priority for every reader of this process still at idle: called when
    the load starts and waits on the bytes itself."""
    with _lock:
        for tid in list(_idle_readers):
            _set_io_class(tid, "normal")
            _idle_readers.discard(tid)
        for row in _claimed.values():
            if row.get("priority") == "idle" and "finished" not in row:
                row["hurried"] = time.perf_counter()


def _set_io_class(tid: int, priority: str) -> bool:
    """ioprio_set(2) for one thread of this process; False where the platform has no such call."""
    number = _SYS_IOPRIO_SET.get(platform.machine())
    if number is None or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(number, 1, tid, _IOPRIO_CLASS[priority] << 13) == 0  # 1: IOPRIO_WHO_PROCESS
    except (OSError, AttributeError):
        return False


def available_memory() -> int:
    """Bytes the kernel could give without swapping (MemAvailable: free memory plus the page
    cache it can drop), so a machine whose cache is full of other files still reads ahead;
    free pages where /proc/meminfo is not there; 0 if neither can be told."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _read_all(paths: list[str], priority: str) -> None:
    tid = threading.get_native_id()
    if priority == "idle":
        with _lock:  # not when the load already started (hurry) before this thread did
            if not any("hurried" in _claimed[p] for p in paths) and _set_io_class(tid, "idle"):
                _idle_readers.add(tid)
    view = memoryview(bytearray(_BUFFER))
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                _read_file(fd, view, tid)
            finally:
                os.close(fd)
        except OSError:
            pass  # gone or unreadable: load_shards says so with the file's name
        with _lock:
            _claimed[path]["finished"] = time.perf_counter()
    with _lock:
        _idle_readers.discard(tid)


def _read_file(fd: int, view: memoryview, tid: int) -> None:
    """Read one file front to back: while this reader is idle, 4 MiB at a time with the kernel's
    read-ahead off (one request in flight, so an import's page fault waits for one 4 MiB read at
    most, not for a queue of them); once hurried, 64 MiB reads with the normal read-ahead."""
    offset, gentle = 0, None
    while True:
        if gentle != (tid in _idle_readers):
            gentle = tid in _idle_readers
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM if gentle else os.POSIX_FADV_NORMAL)
        got = os.preadv(fd, [view[:_GENTLE] if gentle else view], offset)
        if got <= 0:
            return
        offset += got


def summary(paths: list[str], now: float | None = None) -> dict | None:
    """What was read ahead of `now` (the load's start) for these files, for the report: files,
    bytes, how long before `now` the first read started, whether all were read by then (and
    how long reading them took), the I/O priority it started at and whether the load found it
    still at idle and raised it (`hurry`); None when none of them was read ahead."""
    now = time.perf_counter() if now is None else now
    with _lock:
        rows = [_claimed[p] for p in dict.fromkeys(os.path.abspath(p) for p in paths) if p in _claimed]
        if not rows:
            return None
        started = min(r["started"] for r in rows)
        done = all("finished" in r for r in rows)
        out = {
            "files": len(rows),
            "bytes": sum(r["bytes"] for r in rows),
            "started_s_before": round(now - started, 3),
            "finished_before": done and max(r["finished"] for r in rows) <= now,
        }
        if done:
            out["read_s"] = round(max(r["finished"] for r in rows) - started, 3)
        out["priority"] = rows[0].get("priority", "normal")
        out["raised_at_load"] = any("hurried" in r for r in rows)
        return out


def resident_fraction(path: str, samples: int = 16, window: int = 2**20) -> float:
    """Share of sampled pages of the file that are in the page cache (mincore on `samples`
    small windows spread over the file); 0.0 where it cannot be told."""
    import ctypes
    import mmap

    if not hasattr(os, "posix_fadvise"):
        return 0.0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        fd = os.open(path, os.O_RDONLY)
    except (OSError, AttributeError):
        return 0.0
    page = mmap.PAGESIZE
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 1.0
        resident = total = 0
        for i in range(samples):
            start = (size * i // samples) // page * page
            length = min(window, size - start)
            if length <= 0:
                continue
            addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
            if addr in (None, ctypes.c_void_p(-1).value):
                return 0.0
            try:
                pages = (length + page - 1) // page
                vec = ctypes.create_string_buffer(pages)
                if libc.mincore(addr, length, vec) != 0:
                    return 0.0
                resident += pages - vec.raw.count(0)  # bit 0 set = resident
                total += pages
            finally:
                libc.munmap(addr, length)
        return resident / total if total else 0.0
    finally:
        os.close(fd)
