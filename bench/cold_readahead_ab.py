"""Cold whole-process A/B of two trees of this package (e.g. before and after a change to the read-ahead).

Each run is a fresh `python -m pipeline` in that tree's directory (its `pipeline` and `conf` come
first on sys.path), timed from the outside (common.timed), after the checkpoint's shards were evicted
from the page cache with posix_fadvise(DONTNEED) (only those files: the libraries stay as warm as the
machine has them), checked with mincore. The trees alternate within each round, the order rotated each
round (common.rotations); the medians come with their spread and the machine record (common.py).

    python bench/cold_readahead_ab.py --tree before=/tmp/ab_before --tree after=/tmp/ab_after \\
        --ckpt /tmp/l400 --rounds 5 --out bench/results/cold_readahead_ab_l400.json -- quantization=none
    (--ckpt builtin: the default job's checkpoint under $MODEL_LOADER_CACHE, overrides as given)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import evict, machine, rotations, shards, spread, timed  # noqa: E402


def run(tree: Path, overrides: list[str]) -> dict:
    run_dir = tempfile.mkdtemp(prefix="cold_ab_")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]),
    }
    sample = timed([sys.executable, "-m", "pipeline", *overrides, f"hydra.run.dir={run_dir}"], env=env, cwd=tree)
    assert sample["rc"] == 0, sample.get("error")
    report = json.loads((Path(run_dir) / "report.json").read_text())
    stages = {s["name"]: s["seconds"] for s in report["stages"]}
    return {**sample, "stages": stages, "page_cache": report["load"].get("page_cache")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", action="append", required=True, help="name=directory")
    ap.add_argument("--ckpt", required=True, help="checkpoint directory, or 'builtin'")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", required=True)
    ap.add_argument("--drop-all", action="store_true", help="empty the whole page cache before each run (root)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    trees = dict(t.split("=", 1) for t in a.tree)
    builtin = a.ckpt == "builtin"
    cache = Path(os.environ.get("MODEL_LOADER_CACHE") or Path.home() / ".cache" / "model-loader")
    ckpt = cache / "smollm2" if builtin else Path(a.ckpt)
    files = shards([ckpt])
    overrides = list(a.overrides) + ([] if builtin else [f"checkpoint.path={ckpt}"])
    for tree in trees.values():  # once warm, unmeasured: bytecode, metric cache
        run(Path(tree), overrides)
    samples = []
    for r, order in rotations(list(trees), a.rounds):
        for name in order:
            assert files and evict(files, a.drop_all) < 0.05, f"{ckpt}: still in the page cache"
            row = {"tree": name, "round": r, "loadavg": os.getloadavg()[0], **run(Path(trees[name]), overrides)}
            samples.append(row)
            print(json.dumps(row), flush=True)
    medians = {n: spread(s["wall_s"] for s in samples if s["tree"] == n) for n in trees}
    out = {"command": sys.argv, "checkpoint": str(ckpt), "machine": machine(), "medians": medians, "samples": samples}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(medians))


if __name__ == "__main__":
    main()
