"""What a shard read-ahead costs the imports running beside it, by read size, on a cold cache.

    python bench/readahead_contention.py /tmp/llama7b out.json

Each round evicts the shards and (as far as it goes) the package's files from the page cache
(common.evict: no root needed), starts one thread reading the checkpoint's shards (in the
read manners startup/readahead_process.py chooses between: 64 MiB reads with the kernel's
read-ahead, or N MiB reads with it off, one request in flight; without its yielding, which
would stop it here), and meanwhile reads every file of the transformers package one after
another in the main thread, the way an import does. Recorded: how long the package took
(against no reader at all) and how fast the reader went meanwhile. Modes alternate; medians with
their spread.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import evict, machine, shards, spread  # noqa: E402

MODES = {"none": None, "normal_64": (64, False), "gentle_4": (4, True), "gentle_8": (8, True), "gentle_16": (16, True)}


def reader(files: list[str], mib: int, gentle: bool, stop: threading.Event, done: list) -> None:
    view = memoryview(bytearray(mib << 20))
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM if gentle else os.POSIX_FADV_NORMAL)
        offset = 0
        while not stop.is_set() and (got := os.preadv(fd, [view], offset)) > 0:
            offset += got
            done[0] += got
        os.close(fd)


def package_files() -> list[str]:
    import importlib.util

    root = importlib.util.find_spec("transformers").submodule_search_locations[0]
    return [os.path.join(d, f) for d, _, names in sorted(os.walk(root)) for f in sorted(names)]


def one(mode: str, shards: list[str], code: list[str]) -> dict:
    evict(code)  # as far as it goes: another process may hold some of them
    assert evict(shards) < 0.05, "cannot evict the shards from the page cache here"
    stop, done = threading.Event(), [0]
    thread = None
    if MODES[mode]:
        mib, gentle = MODES[mode]
        thread = threading.Thread(target=reader, args=(shards, mib, gentle, stop, done), daemon=True)
        thread.start()
        time.sleep(0.5)  # the reader's queue is full when the "imports" start
    start_bytes, t = done[0], time.perf_counter()
    for path in code:
        with open(path, "rb", buffering=0) as fh:
            fh.read()
    code_s = time.perf_counter() - t
    moved = done[0] - start_bytes
    stop.set()
    if thread:
        thread.join()
    return {"mode": mode, "code_s": round(code_s, 3), "reader_gb_per_s": round(moved / code_s / 1e9, 3)}


def main() -> None:
    ckpt, out = sys.argv[1], sys.argv[2]
    files = [str(p) for p in shards([ckpt])]
    code = package_files()
    rows = [one(mode, files, code) for _ in range(int(os.environ.get("ROUNDS", 2))) for mode in MODES]
    summary = {}
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        summary[mode] = {key: spread(r[key] for r in mine) for key in ("code_s", "reader_gb_per_s")}
    result = {"machine": machine(), "files": len(code), "rows": rows, "summary": summary}
    Path(out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
