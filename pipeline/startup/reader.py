"""Cold shards read into the page cache by a thread while the process imports and builds the skeleton.

Stdlib only. Real reads, not `posix_fadvise(WILLNEED)`: Linux serves one WILLNEED call only up
to the device's read-ahead limit (8 MiB of a 64 MiB call on both our machines) and drops the
rest silently. One daemon thread reads each cold shard front to back, 64 MiB at a time into one
reused buffer (a read releases the GIL, so the imports beside it go on); nothing is kept but
the page cache. Files already cached, files this process took before and files beyond half of
the available memory (they would push out what was read before them) are left alone.
No pacing: the A/B that removed the idle-priority reader process is in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

BUFFER = 64 * 2**20
_lock = threading.Lock()
READ_AHEAD: dict[str, dict] = {}  # file -> {bytes, started, finished}: what this process read ahead


def warm(paths: list[str], budget_fraction: float = 0.5) -> threading.Thread | None:
    """Start a thread reading each of `paths` that is cold and not yet taken; the thread (join it to
    wait for the reads), or None when there is nothing to read."""
    budget = int(available_memory() * budget_fraction)
    cold: list[str] = []
    with _lock:
        for path in map(os.path.abspath, paths):
            with contextlib.suppress(OSError):
                size = os.path.getsize(path)
                if path not in READ_AHEAD and size <= budget and resident_fraction(path) < 0.9:
                    cold.append(path)
                    budget -= size
                    READ_AHEAD[path] = {"bytes": size, "started": time.perf_counter()}
    if not cold:
        return None
    thread = threading.Thread(target=_read, args=(cold,), name="read_ahead", daemon=True)
    thread.start()
    return thread


def _read(paths: list[str]) -> None:
    view = memoryview(bytearray(BUFFER))
    for path in paths:
        with contextlib.suppress(OSError):  # gone or unreadable: load_shards says so with its name
            fd = os.open(path, os.O_RDONLY)
            try:
                offset = 0
                while (got := os.preadv(fd, [view], offset)) > 0:
                    offset += got
            finally:
                os.close(fd)
        with _lock:
            READ_AHEAD[path]["finished"] = time.perf_counter()


def summary(paths: list[str], now: float | None = None) -> dict | None:
    """What was read ahead of `now` (the load's start) for these files, for the report: files, bytes,
    how long before `now` the first read started, whether all were read by then and how long that
    took; None when none of them was read ahead."""
    now = time.perf_counter() if now is None else now
    with _lock:
        rows = [READ_AHEAD[p] for p in dict.fromkeys(map(os.path.abspath, paths)) if p in READ_AHEAD]
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
        return out


def available_memory() -> int:
    """Bytes the kernel could give without swapping (MemAvailable: free memory plus the page cache
    it can drop); free pages where /proc/meminfo is not there; 0 if neither can be told."""
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


def resident_fraction(path: str, samples: int = 16, window: int = 2**20) -> float:
    """Share of sampled pages of the file that are in the page cache (mincore on `samples`
    small windows spread over the file); 0.0 where it cannot be told."""
    import ctypes

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
    try:
        size = os.fstat(fd).st_size
        return 1.0 if size == 0 else _sampled(libc, fd, size, samples, window)
    finally:
        os.close(fd)


def _sampled(libc, fd: int, size: int, samples: int, window: int) -> float:
    import ctypes
    import mmap

    page, resident, total = mmap.PAGESIZE, 0, 0
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
