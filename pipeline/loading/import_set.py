"""The files a command's imports read, recorded at the end of a run and read ahead at its next start.

Why: on a cold page cache the imports (torch's CUDA libraries, transformers' thousands of
modules, bitsandbytes) fault gigabytes in a page cluster at a time, each fault a disk round trip
between stretches of Python; the disk idles while Python runs and Python waits while the disk
reads. The CLI starts, before Hydra or torch is imported, a reader process
(loading/readahead_process.py, `ranges`) that reads exactly what the previous run of the same
command touched, in large sequential reads, so the imports find their pages in the cache
(docs/benchmarks.md, "The import set read ahead"). Nothing loaded or planned depends on it.

What is recorded (`record`, once per command and environment, again when a library changed):
- the libraries this process mapped, only the pages its own page tables hold (the present bit
  of /proc/self/pagemap: what it touched, not what other processes left in the cache), latest
  mapped first (the dynamic loader maps top-down: roughly the order they were loaded in);
- the bytecode files of its modules, in import order (sys.modules keeps it).

Stdlib only: `start` runs before anything heavy is imported. Set PIPELINE_IMPORT_READAHEAD=0
to switch it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time

from ..cache_home import cache_dir

MERGE = 256 * 1024  # touched ranges closer than this are read as one: fewer, longer reads
KEEP = 16  # recorded commands kept per environment (the oldest go)
MEMORY_SHARE = 0.25  # never read ahead more than this share of the available memory
_LIBRARY = re.compile(r"\.(so(\.[0-9.]+)?|dylib|pyd)$")
_PRESENT = bytes((b >> 7) for b in range(256))  # pagemap entry's top byte -> its present bit
_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "readahead_process.py")
_state: dict = {}  # this process: env dir, command key, and the reader started for it


def environment_dir() -> str:
    """The import sets of this interpreter and search path (another venv, another set)."""
    ident = repr((sys.executable, sys.version, sys.prefix, sys.path, sys.pycache_prefix))
    return os.path.join(cache_dir(), "imports", hashlib.sha1(ident.encode()).hexdigest()[:16])


def command_key(args: list[str]) -> str:
    """One command's key: its overrides without Hydra's own (a new run dir is the same command)."""
    kept = [a for a in args if not a.lstrip("+").startswith("hydra.")]
    return hashlib.sha1("\0".join(kept).encode()).hexdigest()[:16]


def start(args: list[str]) -> None:
    """Start reading the import set of this command (else of the latest command recorded in this
    environment) into the page cache; nothing when none is recorded, it is too large for the
    available memory, switched off, or no process can start."""
    _state.update(env=environment_dir(), key=command_key(args))
    if os.environ.get("PIPELINE_IMPORT_READAHEAD", "1") == "0" or not sys.executable:
        return
    path = _manifest_for(_state["env"], _state["key"])
    if path is None:
        return
    with contextlib.suppress(OSError, ValueError):
        with open(path) as fh:
            head = json.load(fh)
        from .page_cache import available_memory

        if head.get("bytes", 0) > available_memory() * MEMORY_SHARE:
            return
        import subprocess

        argv = [sys.executable, "-I", "-S", _CHILD, str(os.getpid()), "ranges", path]
        reader = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        os.set_blocking(reader.stdout.fileno(), False)
        _state.update(reader=reader, manifest=path, bytes=head.get("bytes", 0), started=time.perf_counter())
        _state["files"] = len(head.get("libs", [])) + len(head.get("modules", []))


def _manifest_for(env: str, key: str) -> str | None:
    exact = os.path.join(env, key + ".json")
    if os.path.exists(exact):
        return exact
    with contextlib.suppress(OSError):
        known = [os.path.join(env, n) for n in os.listdir(env) if n.endswith(".json")]
        return max(known, key=os.path.getmtime) if known else None
    return None


def summary() -> dict | None:
    """For the report: which import set was read ahead, its bytes, and when it was done (`read_s`
    after the start; None while still reading); None when this process read none ahead."""
    reader = _state.get("reader")
    if reader is None:
        return None
    with contextlib.suppress(OSError, TypeError, ValueError):
        for line in (reader.stdout.read() or b"").splitlines():
            word, *rest = line.split()
            if word == b"ranges":
                _state.update(read_bytes=int(rest[0]), finished=float(rest[1]))
    done = _state.get("finished")
    return {
        "manifest": _state["manifest"],
        "files": _state["files"],
        "bytes": _state["bytes"],
        "read_bytes": _state.get("read_bytes"),
        "read_s": None if done is None else round(done - _state["started"], 3),
    }


def record() -> bool:
    """Write this command's import set (what this process touched) unless the one recorded has
    every library this process maps, unchanged (size, mtime); True when written. Call at the end
    of a run, after `start`."""
    env, key = _state.get("env"), _state.get("key")
    if env is None or os.environ.get("PIPELINE_IMPORT_READAHEAD", "1") == "0":
        return False
    maps = mapped_libraries()
    path = os.path.join(env, key + ".json")
    with contextlib.suppress(OSError, ValueError), open(path) as fh:
        if {_identity(p) for p in maps} <= {tuple(row[:3]) for row in json.load(fh)["libs"]}:
            return False  # every library this run mapped is recorded, unchanged
    libs = []
    for lib, regions in sorted(maps.items(), key=lambda item: -max(r[0] for r in item[1])):
        identity = _identity(lib)  # kept even untouched: the next run compares the whole set
        libs.append([*identity, touched_ranges(regions, identity[1])])
    modules = module_files(set(maps))
    size = sum(n for *_, extents in libs for _, n in extents) + sum(_size(m) for m in modules)
    _write(path, {"bytes": size, "libs": libs, "modules": modules})
    _prune(env)
    return True


def mapped_libraries() -> dict[str, list[tuple[int, int, int]]]:
    """Shared libraries this process maps: path -> [(start, end, file offset)] of each region."""
    out: dict[str, list[tuple[int, int, int]]] = {}
    with contextlib.suppress(OSError), open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or not parts[5].startswith("/"):
                continue
            name = parts[5].rstrip("\n")
            if _LIBRARY.search(name) and os.path.isfile(name):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out.setdefault(name, []).append((start, end, int(parts[2], 16)))
    return out


def touched_ranges(regions: list[tuple[int, int, int]], size: int) -> list[list[int]]:
    """[offset, length] of the file's pages this process' page tables hold, close ones merged."""
    page = os.sysconf("SC_PAGE_SIZE")
    spans: list[tuple[int, int]] = []
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return []
    try:
        for start, end, offset in regions:
            top = os.pread(fd, (end - start) // page * 8, start // page * 8)[7::8].translate(_PRESENT)
            for run in re.finditer(b"\x01+", top):
                spans.append((offset + run.start() * page, min(offset + run.end() * page, size)))
    except OSError:
        return []
    finally:
        os.close(fd)
    merged: list[list[int]] = []
    for a, b in sorted(spans):
        if merged and a - merged[-1][1] < MERGE:
            merged[-1][1] = max(merged[-1][1], b)
        elif b > a:
            merged.append([a, b])
    return [[a, b - a] for a, b in merged]


def module_files(skip: set[str]) -> list[str]:
    """The files Python read for this process' modules, in import order: bytecode where there is."""
    out = []
    for module in list(sys.modules.values()):
        spec = getattr(module, "__spec__", None)
        cached = getattr(spec, "cached", None) if spec is not None else None
        name = cached if cached and os.path.exists(cached) else getattr(module, "__file__", None)
        if isinstance(name, str) and name not in skip and os.path.isfile(name):
            out.append(name)
    return list(dict.fromkeys(out))


def _identity(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return (path, st.st_size, st.st_mtime_ns)


def _size(path: str) -> int:
    with contextlib.suppress(OSError):
        return os.path.getsize(path)
    return 0


def _write(path: str, rows: dict) -> None:
    """Atomically (a sweep's jobs or two ranks may record at once); a read-only cache is no error."""
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(rows, fh)
        os.replace(tmp, path)


def _prune(env: str) -> None:
    with contextlib.suppress(OSError):
        known = sorted((os.path.join(env, n) for n in os.listdir(env) if n.endswith(".json")), key=os.path.getmtime)
        for old in known[:-KEEP]:
            os.remove(old)
