"""Stage 3: swap planned Linear layers for bitsandbytes LLM.int8 modules, still empty.

The modules stay on the meta device; load_shards quantizes each weight on its
planned device as it arrives. Which layers are swapped was fixed by the plan
(int8_targets), so the plan's sizes and the model always agree.
"""
from __future__ import annotations

import logging

from accelerate import init_empty_weights

from ..bnb import import_bitsandbytes
from ..context import LoadContext

log = logging.getLogger(__name__)


def quantize(ctx: LoadContext) -> None:
    plan = ctx.require("plan", "quantize", "plan")
    model = ctx.model
    quant = ctx.quantization
    if quant.get("method", "none") == "none":
        ctx.report["quantization"] = {"method": "none", "quantized": 0, "skipped": []}
        return
    bnb = import_bitsandbytes()

    threshold = quant["threshold"]
    for name in plan.int8_modules:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, leaf)
        with init_empty_weights():
            new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=old.bias is not None,
                                      has_fp16_weights=False, threshold=plan.int8_thresholds.get(name, threshold))
        new.requires_grad_(False)
        new.train(old.training)  # a fresh module is in training mode; bitsandbytes then skips LLM.int8 on the CPU
        setattr(parent, leaf, new)
    ctx.report["quantization"] = {
        "method": "int8",
        "threshold": threshold,
        "quantized": len(plan.int8_modules),
        "skipped": sorted(plan.skipped),
        "skipped_reasons": dict(sorted(plan.skipped.items())),
        "thresholds": dict(plan.int8_thresholds),
        "warnings": list(plan.warnings),
    }
    log.info("int8: %d Linear layers to LLM.int8 (threshold %.2f), %d skipped", len(plan.int8_modules), threshold, len(plan.skipped))
