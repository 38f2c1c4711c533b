"""Issue 30: generate 20 tokens on the int8 SmolLM2 that `pipeline.load()` returns, against the same model
run as the pipeline ran it before (its forward wrapped in portable numerics), in one process, alternating.

Usage: .venv/bin/python bench/generate_int8.py [--rounds 3] [--out FILE] [load overrides...]
Prints one JSON object (medians of wall and process CPU seconds, every sample); writes it to --out when
given. CPU seconds say more than wall time on a shared machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, spread  # noqa: E402

from pipeline import load  # noqa: E402
from pipeline.quant.cpu_numerics import portable_numerics  # noqa: E402

PROMPT = "The capital of France is"


def as_before(model):
    """The model as quantize left it before issue 30: every forward (so generate) under portable numerics."""
    inner = type(model).forward.__get__(model)

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        with portable_numerics(model):
            return inner(*args, **kwargs)

    model.forward = forward
    return model


def timed_generate(model, ids) -> tuple[float, float, torch.Tensor]:
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    return time.perf_counter() - start, time.process_time() - cpu, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("--threads", type=int, help="torch threads (1: no OpenMP spinning on a busy machine)")
    args, overrides = ap.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = load(overrides, run_dir="/tmp/generate_int8_run")  # the default job: SmolLM2 int8, validate included
    model = r.model
    untouched = "forward" not in model.__dict__
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(r.report["checkpoint"]["path"], local_files_only=True)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    samples: dict = {"after": [], "before": [], "after_cpu": [], "before_cpu": []}
    texts = {}
    timed_generate(model, ids)  # warm-up (first-call imports and allocations)
    for _ in range(args.rounds):
        for name in ("after", "before"):
            if name == "before":
                as_before(model)
            seconds, cpu, out = timed_generate(model, ids)
            model.__dict__.pop("forward", None)
            samples[name].append(round(seconds, 3))
            samples[f"{name}_cpu"].append(round(cpu, 3))
            texts[name] = tok.decode(out[0, ids.shape[1] :])
    med = {k: spread(v)["median"] for k, v in samples.items()}
    found = {
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "report_cpu_numerics": r.report["quantization"]["cpu_numerics"],
        "returned_model_untouched": untouched,
        "median_s": med,
        "speedup": round(med["before"] / med["after"], 2),
        "speedup_cpu": round(med["before_cpu"] / med["after_cpu"], 2),
        "overrides": overrides,
        "samples_s": samples,
        "texts": texts,
    }
    print(json.dumps(found, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(found, indent=1) + "\n")


if __name__ == "__main__":
    main()
