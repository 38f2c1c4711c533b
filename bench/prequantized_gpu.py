"""Pre-quantized bitsandbytes checkpoints on a GPU (CI has none): both directions, int8, nf4, fp4.

transformers -> ours: a directory transformers quantized on the GPU and saved loads through the
pipeline (auto device map: the GPU) with every state_dict tensor and the logits equal to
from_pretrained(dir, device_map={"": 0}). ours -> transformers: our save stage's output loads in
from_pretrained with the same tensors and logits. Prints one JSON object per check.
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

from common import machine  # noqa: E402
from helpers import BNB_KINDS, make_checkpoint  # noqa: E402

from pipeline import load  # noqa: E402

SAVE = "stages=[instantiate_empty,plan,quantize,load_shards,validate,save]"
IDS = torch.arange(24).unsqueeze(0)


def transformers_model(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map={"": 0}, **kw)


def compare(ours, theirs) -> dict:
    ids = IDS.to("cuda:0")
    with torch.inference_mode():
        a, b = ours(ids).logits, theirs(ids).logits
    sa, sb = ours.state_dict(), theirs.state_dict()
    bad = [k for k in sb if k not in sa or sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k].to(sa[k].device))]
    devices = sorted({str(t.device) for t in sa.values()})
    return {"tensors": len(sb), "different": bad[:5], "logits_equal": torch.equal(a, b), "devices": devices}


def main() -> None:
    print(json.dumps({"machine": machine()}), flush=True)
    from transformers import BitsAndBytesConfig

    tmp = Path(tempfile.mkdtemp())
    src = make_checkpoint("llama", tmp / "src")
    for kind in ("int8", "nf4", "fp4"):
        hf_dir = tmp / f"hf-{kind}"
        transformers_model(src, quantization_config=BitsAndBytesConfig(**BNB_KINDS[kind])).save_pretrained(hf_dir)
        r = load([f"checkpoint.path={hf_dir}", "quantization=none"], run_dir=tmp / f"r-{kind}")
        out = {"check": f"transformers->ours {kind}", "status": r.report["status"]}
        out["plan_error"] = r.report["validation"]["plan_error"]
        out.update(compare(r.model, transformers_model(hf_dir)))
        print(json.dumps(out), flush=True)
        ours_dir = tmp / f"ours-{kind}"
        r = load(
            [f"checkpoint.path={src}", f"quantization={kind}", SAVE, f"stages.save.path={ours_dir}"],
            run_dir=tmp / f"s-{kind}",
        )
        out = {"check": f"ours->transformers {kind}", "status": r.report["status"]}
        out["plan_error"] = r.report["validation"]["plan_error"]
        out.update(compare(r.model, transformers_model(ours_dir)))
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
