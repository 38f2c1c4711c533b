"""Does reading the import's own files ahead make a cold import floor faster? (issue 16 experiment)

A cold page cache makes the import floor (torch + CUDA init + the model class [+ bitsandbytes])
pay thousands of small page faults into gigabytes of CUDA libraries and thousands of .pyc reads,
each a disk round trip. This records which byte ranges of which files one cold floor process
had in the page cache at its end (mincore over its mapped files and its modules' bytecode),
then times, alternating with the page cache dropped before each: the floor alone, and the floor
with a second process reading those ranges at the same time.

    python bench/import_prefetch.py --quant int8 --rounds 3 --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def resident_extents(path: str, merge: int = 256 * 1024) -> list[tuple[int, int]]:
    """(offset, length) runs of the file's pages in the page cache, gaps under `merge` joined."""
    import ctypes
    import mmap

    from pipeline.loading.page_cache import mincore_libc

    libc = mincore_libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return []
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return [(0, size)]
        try:
            page = mmap.PAGESIZE
            vec = ctypes.create_string_buffer((size + page - 1) // page)
            if libc.mincore(addr, size, vec) != 0:
                return [(0, size)]
            raw = vec.raw
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    runs: list[list[int]] = []
    i, n = 0, len(raw)
    while i < n:
        if raw[i] & 1:
            j = i
            while j < n and raw[j] & 1:
                j += 1
            start, end = i * page, min(j * page, size)
            if runs and start - runs[-1][1] < merge:
                runs[-1][1] = end
            else:
                runs.append([start, end])
            i = j
        else:
            i += 1
    return [(a, b - a) for a, b in runs]


def record(out: str) -> None:
    """After the floor's imports: the files this process mapped (latest mapped first: the
    dynamic loader maps top-down) and its modules' bytecode (import order), with their
    resident ranges."""
    import importlib.util

    mapped: dict[str, int] = {}
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/") and os.path.isfile(parts[5].strip()):
                p = parts[5].strip()
                mapped[p] = max(mapped.get(p, 0), int(parts[0].split("-")[0], 16))
    libs = sorted(mapped, key=lambda p: -mapped[p])
    mods = []
    for m in list(sys.modules.values()):
        f = getattr(m, "__file__", None)
        if not f or f in mapped:
            continue
        if f.endswith(".py"):
            try:
                c = importlib.util.cache_from_source(f)
                mods.append(c if os.path.exists(c) else f)
            except (NotImplementedError, ValueError):
                mods.append(f)
        elif os.path.isfile(f):
            mods.append(f)
    rows = {"libs": [], "modules": []}
    for key, files in (("libs", libs), ("modules", mods)):
        for p in dict.fromkeys(files):
            try:
                ext = resident_extents(p)
            except OSError:
                continue
            if ext:
                rows[key].append([p, ext])
    Path(out).write_text(json.dumps(rows))


def prefetch(manifest: str) -> None:
    """Read the manifest's ranges into the page cache: libraries and bytecode in two threads."""
    rows = json.loads(Path(manifest).read_text())
    t0 = time.perf_counter()

    def stream(entries):
        buf = bytearray(4 << 20)
        view = memoryview(buf)
        for path, extents in entries:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                for off, length in extents:
                    end = off + length
                    while off < end:
                        got = os.preadv(fd, [view[: min(len(buf), end - off)]], off)
                        if got <= 0:
                            break
                        off += got
            finally:
                os.close(fd)

    threads = [threading.Thread(target=stream, args=(rows[k],)) for k in ("libs", "modules")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"prefetch_s": round(time.perf_counter() - t0, 3)}), flush=True)


def floor_argv(quant: str, device: str) -> list[str]:
    here = Path(__file__).resolve().parent
    return [sys.executable, str(here / "whole_process.py"), "--floor", device, "--quant", quant]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default="int8")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("--record", help=argparse.SUPPRESS)
    ap.add_argument("--prefetch", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.record:
        import whole_process

        whole_process.floor(a.device, a.quant != "none")
        return record(a.record)
    if a.prefetch:
        return prefetch(a.prefetch)
    import whole_process as w

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    man = "/tmp/import_manifest.json"
    w.drop_caches()
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--quant", a.quant, "--device", a.device, "--record", man], env=env, check=True
    )
    rec = time.perf_counter() - t
    rows = json.loads(Path(man).read_text())
    size = {k: sum(n for _, ext in v for _, n in ext) for k, v in rows.items()}
    print(json.dumps({"record_run_s": round(rec, 3), "files": {k: len(v) for k, v in rows.items()}, "bytes": size}))
    samples = []
    for r in range(a.rounds):
        order = ["plain", "prefetch"] if r % 2 == 0 else ["prefetch", "plain"]
        for how in order:
            w.drop_caches()
            helper = None
            t = time.perf_counter()
            if how == "prefetch":
                helper = subprocess.Popen([sys.executable, "-I", __file__, "--prefetch", man], stdout=subprocess.PIPE)
            subprocess.run(floor_argv(a.quant, a.device), env=env, check=True)
            wall = time.perf_counter() - t
            s = {"how": how, "round": r, "wall_s": round(wall, 3)}
            if helper:
                s.update(json.loads(helper.communicate()[0]))
            samples.append(s)
            print(json.dumps(s), flush=True)
    med = {h: statistics.median(s["wall_s"] for s in samples if s["how"] == h) for h in ("plain", "prefetch")}
    print(json.dumps({"median": med}))
    if a.out:
        Path(a.out).write_text(json.dumps({"record_bytes": size, "samples": samples, "median": med}, indent=1))


if __name__ == "__main__":
    main()
