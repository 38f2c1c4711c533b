"""One fresh-process GPU load (issue 16): load.seconds of bf16/int8/nf4 as a new process sees it.

    python bench/fresh_load.py CKPT METHOD [prewarm]

`prewarm` first runs bitsandbytes' quantization once on a small tensor on the GPU (its kernels'
first use), to see how much of an int8/nf4 load's extra time is that first use. Prints JSON.
`load_to_gpu` is the load both this and bench/quant_overlap.py time.
"""

import json
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from pipeline import load  # noqa: E402


def load_to_gpu(ck: str, method: str, run_dir: str, extra=()):
    """The 7B-shaped checkpoint onto GPU 0, up to load_shards; int8/nf4 leave the rest in bf16 (as transformers)."""
    rest = ["quantization.unquantized_dtype=null"] if method != "none" else []
    overrides = [f"checkpoint.path={ck}", f"quantization={method}", "dtype=bf16", "memory.max_memory={0: 100GiB}"]
    overrides += ["stages=[instantiate_empty,plan,quantize,load_shards]", *rest, *extra]
    return load(overrides, run_dir=run_dir)


def prewarm(method: str) -> float:
    """bitsandbytes' quantization once on a small GPU tensor (its import included); seconds."""
    from pipeline.quant.bnb import import_bitsandbytes

    t = time.perf_counter()
    bnb = import_bitsandbytes()
    w = torch.ones(64, 64, device="cuda", dtype=torch.bfloat16)
    if method == "int8":
        bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
    else:
        bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=method)
    torch.cuda.synchronize()
    return round(time.perf_counter() - t, 3)


if __name__ == "__main__":
    ck, method = sys.argv[1], sys.argv[2]
    pre = prewarm(method) if len(sys.argv) > 3 else None
    r = load_to_gpu(ck, method, f"/tmp/fresh/{method}_{time.time_ns()}")
    stages = {s["name"]: s["seconds"] for s in r.report["stages"]}
    out = {"method": method, "prewarm_s": pre, "load_s": r.report["load"]["seconds"], "stages": stages}
    print(json.dumps({**out, "process_s": round(time.perf_counter() - T0, 2)}))
