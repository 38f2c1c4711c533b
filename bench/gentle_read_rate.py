"""How fast one reader moves a cold shard, by read size, with nothing else on the disk.

    python bench/gentle_read_rate.py /tmp/llama7b out.json

The idle read-ahead (startup/readahead_process.py) reads 4 MiB at a time with the kernel's
read-ahead off, one request in flight, whenever the run's own reads pause: this says what that
costs in pace against larger reads and against 64 MiB reads with the kernel's read-ahead.
Each sample evicts the checkpoint's shards from the page cache (common.evict) and reads SECONDS
seconds of the largest shard; modes alternate, ROUNDS rounds, medians with their spread.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import evict, machine, shards, spread  # noqa: E402

MODES = {"random_4": (4, True), "random_8": (8, True), "random_16": (16, True), "normal_64": (64, False)}


def rate(path: str, mib: int, random: bool, seconds: float) -> float:
    view = memoryview(bytearray(mib << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM if random else os.POSIX_FADV_NORMAL)
        offset, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds and (got := os.preadv(fd, [view], offset)) > 0:
            offset += got
        return offset / (time.perf_counter() - start) / 1e9
    finally:
        os.close(fd)


def main() -> None:
    ckpt, out = sys.argv[1], sys.argv[2]
    files = shards([ckpt])
    shard = max(files, key=lambda p: p.stat().st_size)
    seconds = float(os.environ.get("SECONDS_EACH", 3))
    rows = []
    for _ in range(int(os.environ.get("ROUNDS", 2))):
        for mode, (mib, random) in MODES.items():
            assert evict(files) < 0.05, "cannot evict the shards from the page cache here"
            rows.append({"mode": mode, "gb_per_s": round(rate(str(shard), mib, random, seconds), 3)})
    summary = {m: spread(r["gb_per_s"] for r in rows if r["mode"] == m) for m in MODES}
    result = {"machine": machine(), "shard": shard.name, "seconds": seconds, "rows": rows, "summary": summary}
    Path(out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
