"""int8 on one GPU with most layers planned on the CPU: quantization.offloaded=int8 (run on the CPU)
against keep (streamed to the GPU per forward). Load time, plan error, greedy tokens/s. One JSON line each."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from pipeline import load  # noqa: E402


def main(ckpt: str, gpu_cap: str) -> None:
    print(json.dumps({"machine": machine()}), flush=True)
    for mode in ("int8", "keep"):
        t0 = time.perf_counter()
        r = load(
            [
                f"checkpoint.path={ckpt}",
                "quantization=int8",
                f"quantization.offloaded={mode}",
                "quantization.unquantized_dtype=null",
                f"memory.max_memory={{0: {gpu_cap}, cpu: 100GiB}}",
                "stages.load_shards.progress=false",
                "stages.validate.metrics.perplexity=false",
                "stages.validate.metrics.reference=false",
                "stages.validate.max_new_tokens=0",
            ],
            run_dir=f"/tmp/offload7b_{mode}",
        )
        wall = time.perf_counter() - t0
        ids = torch.arange(1, 9).unsqueeze(0).cuda()
        with torch.inference_mode():
            r.model.generate(ids, max_new_tokens=2, do_sample=False)
            t1 = time.perf_counter()
            out = r.model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
            gen = time.perf_counter() - t1
        q = r.report["quantization"]
        print(
            json.dumps(
                {
                    "offloaded": mode,
                    "ok": r.ok,
                    "wall_s": round(wall, 2),
                    "stages": {s["name"]: s["seconds"] for s in r.report["stages"]},
                    "predicted": r.report["plan"]["predicted_bytes"],
                    "plan_error": r.report["validation"]["plan_error"],
                    "quantized": q["quantized"],
                    "kept": sum(v.startswith("offloaded") for v in q["skipped_reasons"].values()),
                    "tokens_per_s": round((out.shape[1] - ids.shape[1]) / gen, 2),
                }
            ),
            flush=True,
        )
        del r
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "4GiB")
