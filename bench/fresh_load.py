"""One fresh-process GPU load (issue 16): load.seconds of bf16/int8/nf4 as a new process sees it.

    python bench/fresh_load.py CKPT METHOD [prewarm]

`prewarm` first runs bitsandbytes' quantization once on a small tensor on the GPU (its kernels'
first use), to see how much of an int8/nf4 load's extra time is that first use. Prints JSON.
"""

import json
import sys
import time
from pathlib import Path

t0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from pipeline import load  # noqa: E402

ck, method = sys.argv[1], sys.argv[2]
pre = None
if len(sys.argv) > 3:
    from pipeline.quant.bnb import import_bitsandbytes

    bnb = import_bitsandbytes()
    t = time.perf_counter()
    w = torch.ones(64, 64, device="cuda", dtype=torch.bfloat16)
    if method == "int8":
        bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
    else:
        bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=method)
    torch.cuda.synchronize()
    pre = round(time.perf_counter() - t, 3)
extra = ["quantization.unquantized_dtype=null"] if method != "none" else []
r = load(
    [
        f"checkpoint.path={ck}",
        f"quantization={method}",
        "dtype=bf16",
        "memory.max_memory={0: 100GiB}",
        "stages=[instantiate_empty,plan,quantize,load_shards]",
        *extra,
    ],
    run_dir=f"/tmp/fresh/{method}_{time.time_ns()}",
)
print(
    json.dumps(
        {
            "method": method,
            "prewarm_s": pre,
            "load_s": r.report["load"]["seconds"],
            "stages": {s["name"]: s["seconds"] for s in r.report["stages"]},
            "process_s": round(time.perf_counter() - t0, 2),
        }
    )
)
