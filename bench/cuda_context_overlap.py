"""Does creating the CUDA context through the driver, off the GIL, overlap Python's imports?

Two kinds of fresh process, alternating: "serial" imports torch and the model class, then makes
torch's CUDA context (what the import floor does); "driver_first" starts
startup/cuda_context.retain_primary_contexts([0]) first, then does the same. Each reports its
own phases; the wall time is taken from outside. One JSON line per sample, medians last.

    python bench/cuda_context_overlap.py --rounds 3 --out ctx.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(driver_first: bool) -> None:
    t0 = time.perf_counter()
    if driver_first:
        sys.path.insert(0, str(REPO))
        from pipeline.startup.cuda_context import retain_primary_contexts

        retain_primary_contexts([0])
    import torch
    from transformers import LlamaForCausalLM  # noqa: F401

    t1 = time.perf_counter()
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(json.dumps({"imports_s": round(t1 - t0, 3), "torch_cuda_init_s": round(t2 - t1, 3)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("--child", choices=["serial", "driver_first"])
    a = ap.parse_args()
    if a.child:
        return child(a.child == "driver_first")
    samples = []
    kinds = ["serial", "driver_first"]
    for r in range(a.rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            t = time.perf_counter()
            out = subprocess.run(
                [sys.executable, __file__, "--child", kind], capture_output=True, text=True, env=os.environ
            )
            wall = time.perf_counter() - t
            s = {"kind": kind, "round": r, "wall_s": round(wall, 3), "rc": out.returncode}
            if out.returncode == 0:
                s.update(json.loads(out.stdout.strip().splitlines()[-1]))
            else:
                s["error"] = out.stderr.strip().splitlines()[-3:]
            samples.append(s)
            print(json.dumps(s), flush=True)
    summary = {}
    for kind in kinds:
        ok = [s for s in samples if s["kind"] == kind and s["rc"] == 0]
        if ok:
            summary[kind] = {
                k: statistics.median(s[k] for s in ok) for k in ("wall_s", "imports_s", "torch_cuda_init_s")
            }
    print(json.dumps({"medians": summary}))
    if a.out:
        Path(a.out).write_text(json.dumps({"samples": samples, "medians": summary}, indent=1))


if __name__ == "__main__":
    main()
