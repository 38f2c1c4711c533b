"""Getting cold shards into the page cache while the process does other things (imports, skeleton).

No torch here: the runner starts this before the model code is imported and the skeleton is built, so the
disk works while Python does. Real reads, not `posix_fadvise(WILLNEED)` (Linux drops most of a large one), in
a process of their own (startup/readahead_process.py), at idle priority until `hurry()`: the imports' small
cold reads must not queue behind the read-ahead. Measurements and the A/B that kept this pacing:
docs/design.md, "Reads overlapped with imports", and docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

_lock = threading.Lock()
READ_AHEAD: dict[str, dict] = {}  # file -> {bytes, started, priority, finished, ...}: what this process read ahead
_readers: list = []  # subprocess.Popen of each reader still running, for hurry()
_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "readahead_process.py")
PRIORITIES = ("idle", "normal")  # the first is stages.load_shards.readahead_priority's default (ReaderOptions)


def warm(paths: list[str], priority: str = "normal") -> threading.Thread | None:
    """Start a reader process reading, front to back, each of `paths` that is not yet in the page
    cache, at `priority` ("idle" or "normal"); files another warmer of this process already
    took, and files beyond half of the available memory (they would push out what
    was read before them) are left alone. Returns the thread that follows the reader (join it
    to wait for the reads); None when there is nothing to read or no reader could start."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority {priority!r}: one of {PRIORITIES}")
    budget = available_memory() // 2
    with _lock:
        cold: list[str] = []
        for path in paths:
            path = os.path.abspath(path)
            if path in READ_AHEAD:
                continue
            with contextlib.suppress(OSError):
                size = os.path.getsize(path)
                if size <= budget and resident_fraction(path) < 0.9:
                    cold.append(path)
                    budget -= size
                    READ_AHEAD[path] = {"bytes": size, "priority": priority}
        if not cold:
            return None
        reader = _spawn(cold, priority)
        if reader is None:
            for path in cold:
                del READ_AHEAD[path]
            return None
        started = time.perf_counter()
        for path in cold:
            READ_AHEAD[path]["started"] = started
        _readers.append(reader)
    thread = threading.Thread(target=_follow, args=(reader, cold), name="page_cache", daemon=True)
    thread.start()
    return thread


def _spawn(files: list[str], priority: str):
    """The reader process (`python -I -S readahead_process.py`), or None where none can start."""
    if not sys.executable or not os.path.exists(_CHILD):
        return None
    import subprocess

    argv = [sys.executable, "-I", "-S", _CHILD, str(os.getpid()), priority, *files]
    try:
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except OSError:
        return None


def _follow(reader, files: list[str]) -> None:
    """Record what the reader says (its I/O class, each file as it finishes), then reap it."""
    with reader.stdout:
        for line in reader.stdout:
            word, *rest = line.split()
            with _lock:
                if word == b"class":
                    for path in files:
                        READ_AHEAD[path]["io_class"] = int(rest[0])
                elif word == b"yielded":
                    for path in files:
                        READ_AHEAD[path]["yielded_s"] = float(rest[0])
                elif word == b"file":
                    index, finished, gentle, fast, yielded = rest
                    READ_AHEAD[files[int(index)]].update(
                        finished=float(finished),
                        gentle_reads=int(gentle),
                        fast_reads=int(fast),
                        yielded_s=float(yielded),
                    )
    reader.wait()
    with _lock:
        _readers.remove(reader)


def hurry() -> None:
    """Back to full-speed reads at normal I/O priority for every reader of this process: called
    when the load starts and waits on the bytes itself."""
    with _lock:
        for reader in _readers:
            with contextlib.suppress(OSError, ValueError):
                reader.stdin.write(b"h")
                reader.stdin.flush()
        for row in READ_AHEAD.values():
            if row.get("priority") == "idle" and "finished" not in row:
                row["hurried"] = time.perf_counter()


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


def summary(paths: list[str], now: float | None = None) -> dict | None:
    """report.json `load.page_cache`: what was read ahead of `now` (the load's start) for these files (the fields:
    docs/design.md, "Reads overlapped with imports"; `yielded_s` as of the reader's last word: a finished file or
    the hurry); None when none of them was read ahead."""
    now = time.perf_counter() if now is None else now
    with _lock:
        rows = [READ_AHEAD[p] for p in dict.fromkeys(os.path.abspath(p) for p in paths) if p in READ_AHEAD]
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
        out["yielded_s"] = round(max(r.get("yielded_s", 0.0) for r in rows), 3)
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
