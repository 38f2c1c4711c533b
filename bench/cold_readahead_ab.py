"""Cold whole-process A/B of two trees of this package (e.g. before and after a change to the read-ahead).

Each run is a fresh `python -m pipeline` in that tree's directory (its `pipeline` and `conf` come
first on sys.path), timed from the outside, after the checkpoint's shards were evicted from the page
cache with posix_fadvise(DONTNEED) (only those files: the libraries stay as warm as the machine has
them), checked with mincore. The trees alternate within each round, the first one swapped each round.

    python bench/cold_readahead_ab.py --tree before=/tmp/ab_before --tree after=/tmp/ab_after \\
        --ckpt /tmp/l400 --rounds 5 --out bench/results/cold_readahead_ab_l400.json -- quantization=none
    (--ckpt builtin: the default job's checkpoint under $MODEL_LOADER_CACHE, overrides as given)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("AB_IMPORT_ROOT", str(REPO)))  # a tree whose pipeline/startup/reader.py to use

from pipeline.startup.reader import resident_fraction  # noqa: E402


def evict(ckpt: Path, everything: bool) -> None:
    """The shards' pages (posix_fadvise DONTNEED), or with `everything` the whole page cache (root only)."""
    shards = sorted(ckpt.glob("*.safetensors"))
    if everything:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    for shard in shards:
        fd = os.open(shard, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    assert shards and all(resident_fraction(str(s)) < 0.05 for s in shards), f"{ckpt}: still in the page cache"


def run(tree: Path, overrides: list[str]) -> dict:
    run_dir = tempfile.mkdtemp(prefix="cold_ab_")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((Path(run_dir) / "report.json").read_text())
    stages = {s["name"]: s["seconds"] for s in report["stages"]}
    return {"wall_s": round(wall, 3), "stages": stages, "page_cache": report["load"].get("page_cache")}


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", action="append", required=True, help="name=directory")
    ap.add_argument("--ckpt", required=True, help="checkpoint directory, or 'builtin'")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", required=True)
    ap.add_argument("--drop-all", action="store_true", help="empty the whole page cache before each run (root)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    trees = [(n, Path(d)) for n, d in (t.split("=", 1) for t in a.tree)]
    builtin = a.ckpt == "builtin"
    cache = Path(os.environ.get("MODEL_LOADER_CACHE") or Path.home() / ".cache" / "model-loader")
    ckpt = cache / "smollm2" if builtin else Path(a.ckpt)
    overrides = list(a.overrides) + ([] if builtin else [f"checkpoint.path={ckpt}"])
    for _, tree in trees:  # once warm, unmeasured: bytecode, metric cache
        run(tree, overrides)
    samples = []
    for r in range(a.rounds):
        for name, tree in trees if r % 2 == 0 else trees[::-1]:
            evict(ckpt, a.drop_all)
            row = {"tree": name, "round": r, "loadavg": os.getloadavg()[0], **run(tree, overrides)}
            samples.append(row)
            print(json.dumps(row), flush=True)
    medians = {n: statistics.median(s["wall_s"] for s in samples if s["tree"] == n) for n, _ in trees}
    machine = {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
    out = {"command": sys.argv, "checkpoint": str(ckpt), "machine": machine, "medians": medians, "samples": samples}
    out["versions"] = {n: _version(n) for n in ("torch", "transformers", "hydra-core", "safetensors")}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(medians))


if __name__ == "__main__":
    main()
