"""The combination matrix's GPU rows (CI has no GPU): tests/test_matrix.py's families and quantizations
on GPU 0 alone, GPU 0 + CPU (twice) and GPU 0 + CPU + disk, fp32 and bf16.

- gpu: every module on GPU 0.
- gpu_cpu: embeddings and the first half of the no-split blocks on GPU 0; the other blocks and the output
  head (with what is tied to it) on the CPU. By default (quantization.offloaded = the method) the CPU's
  quantized layers are quantized and run on the CPU, so their kernels are the CPU's: the logits differ from
  GPU alone by that (max abs difference printed). Unquantized CPU modules are streamed to the GPU.
- gpu_cpu_keep: the same map with quantization.offloaded=keep: the CPU's layers stay unquantized and are
  streamed to the GPU, so the same kernels run as on GPU 0 alone with those layers skipped.
- gpu_cpu_disk: as gpu_cpu, but the other blocks on disk (read in place, run unquantized on the GPU).

Every cell must end ok with every check passing and plan error 0; its logits are compared with the same
configuration on GPU 0 alone with the same layers left unquantized. A cell the plan refuses prints its
one-line reason. One JSON object per cell; a summary line at the end.

    python bench/gpu_matrix.py [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from architectures import build, inputs_for  # noqa: E402
from common import Results  # noqa: E402
from test_matrix import FAMILIES, NO_METRICS, QUANTIZATION, _saved_quantized, _skeleton  # noqa: E402

from pipeline import load  # noqa: E402
from pipeline.errors import UserError  # noqa: E402

PLACEMENTS = ("gpu", "gpu_cpu", "gpu_cpu_keep", "gpu_cpu_disk")
DTYPES = ("fp32", "bf16")


def placement_map(path, placement: str) -> str:
    model = _skeleton(path)
    entries = {name: 0 for name, _ in model.named_children()}
    if placement != "gpu":
        blocks = [n for n, m in model.named_modules() if type(m).__name__ in set(model._no_split_modules or ())]
        rest = "disk" if placement == "gpu_cpu_disk" else "cpu"  # gpu_cpu_keep: the map of gpu_cpu
        entries.update({n: rest for n in blocks[len(blocks) // 2 :]})
        head = model.get_output_embeddings().weight
        for name, module in model.named_modules():
            if any(p is head for p in module.parameters(recurse=False)):
                entries[name] = "cpu"
        head_name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        entries[head_name] = "cpu"
    return "device_map.map={" + ", ".join(f"{k}: {v}" for k, v in entries.items()) + "}"


def overrides(path, quant: str, placement: str, dtype: str, skipped=()) -> list[str]:
    method = "none" if quant.startswith("prequantized_") else quant
    out = [f"checkpoint.path={path}", f"quantization={method}", f"dtype={dtype}", *NO_METRICS]
    out += ["device_map=explicit", placement_map(path, placement)]
    if placement == "gpu_cpu_keep":
        out.append("quantization.offloaded=keep")
    if skipped:
        out.append(f"quantization.skip_modules=[{','.join(skipped)}]")
    return out


def logits(model) -> torch.Tensor:
    inputs = {k: v.to("cuda:0") for k, v in inputs_for(model).items()}
    with torch.no_grad():
        return model(**inputs).logits.float().cpu()


def cell(path, quant, placement, dtype, tmp: Path) -> dict:
    out = {"quant": quant, "placement": placement, "dtype": dtype}
    try:
        r = load(overrides(path, quant, placement, dtype), run_dir=tmp / "run")
    except UserError as exc:
        return {**out, "result": "refused", "reason": str(exc)}
    v = r.report["validation"]
    out.update(status=r.report["status"], checks_ok=all(v["checks"].values()), plan_error=v["plan_error"])
    reasons = (r.report.get("quantization") or {}).get("skipped_reasons", {})
    skipped = sorted(m for m, why in reasons.items() if why.startswith("offloaded"))
    ours = logits(r.model)
    del r
    ref = load(overrides(path, quant, "gpu", dtype, skipped), run_dir=tmp / "ref")
    theirs = logits(ref.model)
    out["logits_equal"] = bool(torch.equal(ours, theirs))
    out["max_abs_diff"] = float((ours - theirs).abs().max())
    out["result"] = "ok" if out["checks_ok"] and out["status"] == "ok" else "FAILED"
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = Results(args.out)  # the machine first, then one line per cell
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            src = build(FAMILIES[family], Path(tmp) / family, shards=3)
            for quant in QUANTIZATION:
                path = src
                if quant.startswith("prequantized_"):
                    path = _saved_quantized(src, Path(tmp) / f"{family}_{quant}", quant.removeprefix("prequantized_"))
                for placement, dtype in itertools.product(PLACEMENTS, DTYPES):
                    case = Path(tmp) / f"{family}-{quant}-{placement}-{dtype}"
                    row = {"family": family, **cell(path, quant, placement, dtype, case)}
                    rows.append(row)
                    results.add(row)
                    torch.cuda.empty_cache()
    counts = {k: sum(r["result"] == k for r in rows) for k in ("ok", "refused", "FAILED")}
    equal = sum(bool(r.get("logits_equal")) for r in rows)
    results.add({"cells": len(rows), **counts, "logits_equal": equal, "device": torch.cuda.get_device_name(0)})
    sys.exit(1 if counts["FAILED"] else 0)


if __name__ == "__main__":
    main()
