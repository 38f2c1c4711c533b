"""Where an int8/nf4 GPU load spends the time bf16 does not (issue 16): one process, warm page cache.

For each setting, load_shards only (no validate), 2 rounds: load.seconds, and inside the streamer's
main loop the host seconds spent waiting for reads and in `finish` (cast/quantize/assign), plus
the GPU quantization of the same weights alone (already on the GPU, synchronized). Prints JSON lines.
"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fresh_load import load_to_gpu  # noqa: E402

from pipeline.loading import streamer as st  # noqa: E402

ck = sys.argv[1]
acc = {"wait": 0.0, "finish": 0.0, "n": 0}
orig = st.ShardStreamer._finish


def timed_finish(self, item, finish):
    t = time.perf_counter()
    for fut in item.futures:
        fut.result()
    t2 = time.perf_counter()
    out = orig(self, item, finish)
    acc["wait"] += t2 - t
    acc["finish"] += time.perf_counter() - t2
    acc["n"] += 1
    return out


st.ShardStreamer._finish = timed_finish
settings = [
    ("none", []),
    ("int8", []),
    ("nf4", []),
    ("int8", ["stages.load_shards.temp_mib=8192"]),
    ("nf4", ["stages.load_shards.temp_mib=8192"]),
]
for method, extra in settings:
    for rnd in range(2):
        acc.update(wait=0.0, finish=0.0, n=0)
        t = time.perf_counter()
        r = load_to_gpu(ck, method, f"/tmp/qo/{method}_{rnd}_{len(extra)}", extra)
        total = time.perf_counter() - t
        print(
            json.dumps(
                {
                    "method": method,
                    "extra": extra,
                    "round": rnd,
                    "load_s": r.report["load"]["seconds"],
                    "stages": {s["name"]: s["seconds"] for s in r.report["stages"]},
                    "wait_s": round(acc["wait"], 3),
                    "finish_s": round(acc["finish"], 3),
                    "items": acc["n"],
                    "process_s": round(total, 2),
                }
            ),
            flush=True,
        )
        del r
        torch.cuda.empty_cache()
# GPU quantization alone, on weights already on the GPU
from pipeline.quant.bnb import quantize_int8  # noqa: E402

ws = [torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
for name, fn in (("int8", quantize_int8),):
    try:
        fn(ws[0])
        torch.cuda.synchronize()
        t = time.perf_counter()
        for w in ws:
            fn(w)
        torch.cuda.synchronize()
        per = (time.perf_counter() - t) / len(ws)
        print(
            json.dumps(
                {
                    "quantize_alone": name,
                    "per_4096x4096_s": round(per, 5),
                    "weights_of_7b_s": round(per * 6.5e9 / 4096**2, 3),
                }
            )
        )
    except Exception as e:  # signature differences: say so
        print(json.dumps({"quantize_alone": name, "error": repr(e)[:200]}))
