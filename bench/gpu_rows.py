"""The GPU rows of docs/benchmarks.md in one command on a lent GPU host, in under 8 minutes.

Cold and warm whole-process loads, ours (`python -m pipeline`, every check and the forward pass)
against transformers' `from_pretrained(device_map="cuda")` + one forward, bf16 and int8, alternating
(bench/whole_process.py's gpu suite), on a synthetic checkpoint with Llama-2-7B's tensor shapes and 8 of
its 32 layers (3.8 GB in one shard: a 7B's tensors, written in seconds). Cold: the shards evicted from
the page cache (posix_fadvise, no root needed); the libraries stay cached. Also one sequential read of
the cold shards (the disk's speed, the cold target's reference). Rounds run until --budget is spent
(whole rounds only); every line of --out is JSON: the machine, the checkpoint, the read, each sample,
the summary (medians, ours vs transformers).

On the GPU host (torch, transformers, accelerate, safetensors installed; bitsandbytes and Hydra not),
from the repository root, one command:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH HF_HUB_OFFLINE=1 && python3 bench/gpu_rows.py --out $OUT/gpu_rows.jsonl

Here, without a GPU, to try it: python bench/gpu_rows.py --device cpu --layers 1 --rounds 1 --out /tmp/r.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import whole_process  # noqa: E402
from common import Results, evict, shards  # noqa: E402

T0 = time.perf_counter()


def checkpoint(dest: Path, layers: int) -> dict:
    """Llama-2-7B's shapes with `layers` layers, bf16, one shard (written once; kept when there)."""
    if (dest / "config.json").exists():
        return {"checkpoint": str(dest), "written_s": None, "bytes": sum(f.stat().st_size for f in shards([dest]))}
    import torch

    from pipeline.checkpoint import synthetic

    name = f"llama-7b-{layers}l"
    synthetic.SHAPES[name] = {**synthetic.SHAPES["llama-7b"], "num_hidden_layers": layers}
    t = time.perf_counter()
    synthetic.write_checkpoint(str(dest), name, torch.bfloat16, max_shard_bytes=20 * 10**9)
    files = shards([dest])
    return {"checkpoint": str(dest), "shape": name, "written_s": round(time.perf_counter() - t, 1)} | {
        "bytes": sum(f.stat().st_size for f in files)
    }


def sequential_read(files: list[Path]) -> dict:
    """One thread reading the evicted shards front to back: what the disk gives a cold load."""
    left = evict(files)
    buf = bytearray(64 * 2**20)
    t = time.perf_counter()
    n = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while k := fh.readinto(buf):
                n += k
    s = time.perf_counter() - t
    return {"sequential_read_cold_s": round(s, 3), "gb_per_s": round(n / s / 1e9, 3), "resident_before": left}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON lines")
    ap.add_argument("--dir", default="/tmp/gpu_rows_llama7b", type=Path, help="checkpoint (written if missing)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quant", default="none,int8")
    ap.add_argument("--rounds", type=int, default=5, help="at most; fewer when --budget ends them")
    ap.add_argument("--budget", type=float, default=420, help="seconds from the start; no round begins past it")
    ap.add_argument("--floors", action="store_true", help="also the import floors (two more processes a round)")
    a = ap.parse_args()
    results = Results(a.out)
    ck = checkpoint(a.dir, a.layers)
    results.add(ck)
    results.add(sequential_read(shards([a.dir])))
    argv = ["--suite", "gpu", "--device", a.device, "--dir", str(a.dir), "--quant", a.quant, "--cold"]
    argv += ["--rounds", str(a.rounds), "--timeout", "150", "--budget", str(a.budget - (time.perf_counter() - T0))]
    wp = whole_process.parser().parse_args(argv + ([] if a.floors else ["--no-floors"]))
    whole_process.drive(wp, results)
    results.add({"total_s": round(time.perf_counter() - T0, 1)})


if __name__ == "__main__":
    main()
