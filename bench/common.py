"""What every benchmark here shares: whole-process timing, a cold page cache, medians, alternation, the machine.

A user waits for a whole command, so a method is a fresh process timed from the outside (wall time,
and the child's own peak RSS and CPU seconds from os.wait4). Methods alternate within each round (the
order rotates), so a slow spell of a shared machine falls on every method alike. Every results file
starts with `machine()`: without the CPU, its load and the versions a figure cannot be compared.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "bitsandbytes", "hydra-core")


class _Popen(subprocess.Popen):
    """Popen that reaps its child with wait4, keeping that child's own rusage (peak RSS, CPU seconds)."""

    usage = None

    def _try_wait(self, wait_flags):
        try:
            pid, sts, usage = os.wait4(self.pid, wait_flags)
        except ChildProcessError:
            return (self.pid, 0)
        if pid == self.pid:
            self.usage = usage
        return (pid, sts)


def timed(argv: Sequence[str], env: dict | None = None, cwd=None, timeout: float = 600) -> dict:
    """Run one process to its end: wall seconds, exit code, peak RSS MiB, CPU seconds, its last lines."""
    start = time.perf_counter()
    proc = _Popen(list(argv), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"rc": None, "error": f"timed out after {timeout}s"}
    sample = {"wall_s": round(time.perf_counter() - start, 3), "rc": proc.returncode}
    if proc.usage is not None:
        u = proc.usage
        sample.update(peak_rss_mib=round(u.ru_maxrss / 1024, 1), cpu_s=round(u.ru_utime + u.ru_stime, 3))
    if proc.returncode != 0:
        sample["error"] = out.decode(errors="replace").strip().splitlines()[-3:]
    return sample


def shards(paths: Iterable[str | Path]) -> list[Path]:
    """The .safetensors files of checkpoint directories (or the files themselves)."""
    out = []
    for p in map(Path, paths):
        out += sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    return out


def evict(files: Iterable[Path], everything: bool = False) -> float:
    """Drop these files from the page cache (posix_fadvise DONTNEED: no root needed, and the rest of a
    shared machine keeps its cache); returns the largest fraction still resident (0.0 when cold).
    `everything`: first the whole page cache, as on a fresh host (/proc/sys/vm/drop_caches: root only)."""
    files = list(files)
    os.sync()
    if everything:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return max((resident(f) for f in files), default=0.0)


def warm(files: Iterable[Path]) -> None:
    """Read these files once, so they are in the page cache."""
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 * 2**20):
                pass


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident(path: Path) -> float:
    """Fraction of a file's pages in the page cache (mincore over a read-only mapping: nothing is read)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in bytes(vec)) / pages


def rotations(items: Sequence, rounds: int) -> Iterator[tuple[int, list]]:
    """(round, order): every item once per round, the order rotated by one each round (A/B, B/A, ...)."""
    for r in range(rounds):
        k = r % len(items)
        yield r, list(items[k:]) + list(items[:k])


def spread(values: Iterable[float]) -> dict:
    """Median, min, max and n of some samples (the median is the figure; min..max says how far to trust it)."""
    v = sorted(values)
    if not v:
        return {"n": 0}
    return {"median": round(statistics.median(v), 3), "min": v[0], "max": v[-1], "n": len(v)}


def machine() -> dict:
    """Where and with what a figure was measured: CPU model and cores, the capability torch picks, load
    average, GPU, Python and package versions, the commit, date. Importing torch here costs the parent, not the timed
    children."""
    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "cpu": _cpu_model()}
    out.update(cores=os.cpu_count(), loadavg=[round(x, 2) for x in os.getloadavg()], kernel=platform.release())
    out["python"] = platform.python_version()
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        out["aten_cpu_capability_env"] = os.environ.get("ATEN_CPU_CAPABILITY")
        out["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    out["gpu"] = _gpus()
    out["code"] = _git()
    return out


def _git() -> str | None:
    """The commit measured, marked +dirty when the working tree differs from it."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "--no-optional-locks", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "pipeline"],
            cwd=repo,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _gpus() -> list[str]:
    """nvidia-smi's name and driver per GPU (no CUDA context in this process); [] without one."""
    try:
        q = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        return subprocess.run(q, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return []


class Results:
    """A JSON-lines results file: the machine first, then one line per sample, the summary last."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"machine": machine()}) + "\n")

    def add(self, record: dict) -> None:
        print(json.dumps(record), flush=True)
        if self.path:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
