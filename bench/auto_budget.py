"""quantization=auto at a budget vs the single-method configurations, on SmolLM2 (issue 32; docs/quantization.md).

Each configuration is loaded by pipeline.load (validate's perplexity on the evaluation text, plan and measured
bytes), then the held-out text's perplexity is measured on the same loaded model with validate's own function.
One JSON line per configuration after the machine record. Usage:
  cd bench && ../.venv/bin/python auto_budget.py [RUN_ROOT [CONFIG...]] > results/auto_budget.jsonl
"""

from __future__ import annotations

import json
import sys
import time
from importlib import resources

from common import machine

from pipeline import load
from pipeline.measure import quality

CONFIGS = {
    "none": ["quantization=none"],
    "int8 t=4": ["quantization=int8", "quantization.threshold=4.0"],
    "int8 t=6": ["quantization=int8", "quantization.threshold=6.0"],
    "int8 t=8": ["quantization=int8", "quantization.threshold=8.0"],
    "nf4": ["quantization=nf4"],
    "auto 1%": ["quantization=auto", "quantization.budget=1%"],
    # caps that all-int8 (155.91 MiB) cannot meet and all-nf4 (106.52 MiB) can: the best plan that fits
    "auto caps 130MiB": ["quantization=auto", "quantization.budget=null", "memory.max_memory={cpu: 130MiB}"],
}
QUIET = ["stages.validate.metrics.greedy=false", "stages.validate.metrics.throughput=false"]


def measure(name: str, overrides: list[str], run_root: str) -> dict:
    start = time.perf_counter()
    r = load([*overrides, *QUIET], run_dir=f"{run_root}/{name.replace(' ', '_').replace('%', 'pct')}")
    seconds = time.perf_counter() - start
    metrics = r.report["validation"]["metrics"]
    tokenizer = quality.load_tokenizer(r.report["checkpoint"]["path"])
    heldout = resources.files("pipeline.data").joinpath("heldout.txt").read_text()
    ref = metrics.get("reference_perplexity")
    out = {
        "config": name,
        "status": r.report["status"],
        "seconds": round(seconds, 1),
        "bytes": sum(r.report["plan"]["predicted_bytes"].values()),
        "measured_bytes": r.report["validation"]["measured_bytes"],
        "perplexity": metrics.get("perplexity"),
        "reference_perplexity": ref,
        "heldout_perplexity": round(quality.perplexity(r.model, tokenizer, heldout, 512), 4),
    }
    if "auto" in r.report:
        out["auto"] = {k: v for k, v in r.report["auto"].items() if k != "modules"}
    return out


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "runs/auto_budget"
    print(json.dumps({"machine": machine()}), flush=True)
    wanted = sys.argv[2:] or list(CONFIGS)  # e.g. "auto 1%": only those configurations
    for name, overrides in CONFIGS.items():
        if name not in wanted:
            continue
        print(json.dumps(measure(name, overrides, root)), flush=True)
