"""The conformance families on a GPU (CI has none): the pipeline's load vs from_pretrained(device_map={"": 0}).

Each family of tests/architectures.py is saved by save_pretrained (2+ shards) and loaded both
ways on GPU 0, fp32, bf16 and int8: every parameter and buffer compared bit for bit (int8: codes
and row scales), logits compared, plan error read from the report. Fused tensors (MoE experts)
go through the pinned streamer's assembly path here, which the CPU suite does not reach.
Prints one JSON object per case; exit 1 if any case differs.

    python bench/gpu_conformance.py [family ...]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests"))

from architectures import ARCHITECTURES, BY_FAMILY, build, inputs_for  # noqa: E402
from common import machine  # noqa: E402

from pipeline import load  # noqa: E402

MODES = {
    "fp32": (["quantization=none", "dtype=fp32"], {"dtype": torch.float32}),
    "bf16": (["quantization=none", "dtype=bf16"], {"dtype": torch.bfloat16}),
    "int8": (["quantization=int8", "quantization.unquantized_dtype=null", "dtype=fp32"], "int8"),
}
NO_METRICS = [f"stages.validate.metrics.{m}=false" for m in ("perplexity", "reference", "greedy", "throughput")]


def theirs(arch, path, mode):
    import transformers

    cls = getattr(transformers, arch.model)
    kw = MODES[mode][1]
    if kw == "int8":
        kw = {"quantization_config": transformers.BitsAndBytesConfig(load_in_8bit=True), "dtype": torch.float32}
    return cls.from_pretrained(path, device_map={"": 0}, **kw).eval()


def tensors(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        out[name] = p
        module = model.get_submodule(name.rpartition(".")[0])
        scb = getattr(p, "SCB", None)
        if scb is None and type(module).__name__ == "Linear8bitLt" and name.endswith(".weight"):
            scb = module.state.SCB  # moved into the layer's state by a first forward (validate ran one)
        if scb is not None:
            out[name + ":SCB"] = scb
    for name, b in model.named_buffers():
        out[name] = b
    return out


def compare(ours, ref, arch) -> dict:
    a, b = tensors(ours), tensors(ref)
    differ = sorted(n for n in b if n not in a or a[n].shape != b[n].shape or not torch.equal(a[n].cpu(), b[n].cpu()))
    inputs = {k: v.to("cuda:0") for k, v in inputs_for(ref).items()}
    with torch.inference_mode():
        la, lb = ours(**inputs), ref(**inputs)
    la = getattr(la, "logits", None) if getattr(la, "logits", None) is not None else la[0]
    lb = getattr(lb, "logits", None) if getattr(lb, "logits", None) is not None else lb[0]
    return {
        "tensors": len(b),
        "differ": differ[:8],
        "logits_max_abs_diff": float((la.float() - lb.float()).abs().max()),
        "devices": sorted({str(t.device) for t in a.values()}),
    }


def main(families: list[str]) -> int:
    print(json.dumps({"machine": machine()}), flush=True)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            arch = BY_FAMILY[family]
            path = build(arch, Path(tmp) / family)
            for mode in MODES:
                row = {"family": family, "mode": mode}
                try:
                    result = load([f"checkpoint.path={path}", *MODES[mode][0], *NO_METRICS], run_dir=Path(tmp) / "r")
                    row.update(compare(result.model, theirs(arch, path, mode), arch))
                    row["plan_error"] = result.report["validation"]["plan_error"]
                    row["status"] = result.report["status"]
                    ok = not row["differ"] and row["logits_max_abs_diff"] == 0.0 and row["status"] == "ok"
                except Exception as exc:  # a case that cannot run is reported, the others go on
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    ok = False
                row["ok"] = ok
                bad += not ok
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or [a.family for a in ARCHITECTURES]))
