"""The read-ahead's own process: reads shards into the page cache while its parent imports.

    python -I -S readahead_process.py PARENT_PID idle|normal FILE...

Stdlib only and run by path (no package import), so it starts in milliseconds; a process, not a thread,
because a thread waits for the GIL while the parent imports (docs/design.md, "Reads overlapped with imports").
At `idle` it yields the disk to its parent (reads only once /proc/PARENT/io `read_bytes` paused for one
interval, at most `MAX_YIELD_S` per read), `GENTLE` bytes at a time with the kernel's read-ahead off, at the
idle I/O class. A byte on stdin ("hurry") switches it to `BUFFER`-sized reads at the normal class; end of
stdin (the parent closed it or exited) stops it.

Stdout, one line per event, for startup/reader.py: `class N` (the I/O class read back after
setting it; -1 where it cannot be told), `yielded S` (seconds waited for the parent's reads, when
hurried) and `file INDEX FINISHED GENTLE_READS FAST_READS YIELDED_S` (FINISHED is
time.perf_counter(): CLOCK_MONOTONIC, the parent's clock too).
"""

from __future__ import annotations

import contextlib
import os
import platform
import select
import sys
import time

BUFFER = 64 * 2**20
GENTLE = 4 * 2**20  # one disk request on the hosts measured (max_sectors_kb 1-4 MiB)
QUIET_S = 0.002  # the parent's reads must have paused this long before a gentle read
MAX_YIELD_S = 0.1  # never wait longer than this per read: the read always moves
_IOPRIO = {"x86_64": (251, 252), "aarch64": (30, 31), "riscv64": (30, 31), "ppc64le": (273, 274), "s390x": (282, 283)}
_CLASS = {"idle": 3, "normal": 0}  # IOPRIO_CLASS_IDLE; NONE = best effort from the CPU nice level


class Pace:
    """When and how much to read: gently and after the parent's reads paused, until hurried."""

    def __init__(self, parent: int, gentle: bool):
        self.gentle = gentle
        self.yielded_s = 0.0
        self.stdin_open = True
        self._io = _open_io(parent) if gentle else None
        self._last = self._activity()

    def hurry_or_stop(self, timeout: float = 0.0) -> None:
        """Read stdin, waiting up to `timeout`: a byte means hurry, its end means stop."""
        if not self.stdin_open or not select.select([0], [], [], timeout)[0]:
            return
        if not os.read(0, 64):
            self.stdin_open = False
        elif self.gentle:
            self.gentle = False
            _say(f"class {set_io_class('normal')}")
            _say(f"yielded {self.yielded_s:.4f}")

    def wait_turn(self) -> None:
        """Before a gentle read: wait until the parent issued no storage read for QUIET_S."""
        start = time.perf_counter()
        while self.gentle and self.stdin_open and self._io is not None:
            now = self._activity()
            quiet, self._last = now == self._last, now
            if quiet or time.perf_counter() - start > MAX_YIELD_S:
                break
            self.hurry_or_stop(QUIET_S)
        self.yielded_s += time.perf_counter() - start

    def _activity(self) -> int | None:
        if self._io is None:
            return None
        try:
            for line in os.pread(self._io, 4096, 0).split(b"\n"):
                if line.startswith(b"read_bytes:"):
                    return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        self._io = None  # the parent is gone or its accounting unreadable: just read gently
        return None


def _open_io(parent: int) -> int | None:
    try:
        return os.open(f"/proc/{parent}/io", os.O_RDONLY)
    except OSError:
        return None  # no per-process I/O accounting here (not Linux, or switched off)


def set_io_class(priority: str) -> int:
    """ioprio_set(2) for this process; the class read back, -1 where the platform has none."""
    numbers = _IOPRIO.get(platform.machine())
    if numbers is None or not sys.platform.startswith("linux"):
        return -1
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(numbers[0], 1, 0, _CLASS[priority] << 13)  # 1: IOPRIO_WHO_PROCESS, 0: this one
        value = libc.syscall(numbers[1], 1, 0)
        return value >> 13 if value >= 0 else -1
    except (OSError, AttributeError):
        return -1


def read_file(path: str, view: memoryview, pace: Pace) -> tuple[int, int]:
    """Read one file front to back at the pace's current manner; (gentle reads, fast reads)."""
    counts = [0, 0]
    fd = os.open(path, os.O_RDONLY)
    try:
        offset, gentle = 0, None
        while pace.stdin_open:
            pace.hurry_or_stop()
            if gentle != pace.gentle:
                gentle = pace.gentle
                _advise(fd, gentle)
            if gentle:
                pace.wait_turn()
            got = os.preadv(fd, [view[:GENTLE] if gentle else view], offset)
            if got <= 0:
                break
            offset += got
            counts[0 if gentle else 1] += 1
    finally:
        os.close(fd)
    return counts[0], counts[1]


def _advise(fd: int, gentle: bool) -> None:
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM if gentle else os.POSIX_FADV_NORMAL)


def _say(line: str) -> None:
    try:
        print(line, flush=True)
    except BrokenPipeError:
        sys.exit(0)  # nobody listens any more


def main(argv: list[str]) -> int:
    parent, priority, paths = int(argv[0]), argv[1], argv[2:]
    pace = Pace(parent, gentle=priority == "idle")
    if pace.gentle:
        _say(f"class {set_io_class('idle')}")
    view = memoryview(bytearray(BUFFER))
    for index, path in enumerate(paths):
        try:
            gentle_reads, fast_reads = read_file(path, view, pace)
        except OSError:
            gentle_reads = fast_reads = 0  # gone or unreadable: load_shards says so with its name
        if not pace.stdin_open:
            return 0
        _say(f"file {index} {time.perf_counter()!r} {gentle_reads} {fast_reads} {pace.yielded_s:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
