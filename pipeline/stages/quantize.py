"""Stage 3: swap planned Linear layers for bitsandbytes modules (LLM.int8 or 4-bit), still empty.

The modules stay on the meta device; load_shards quantizes each weight on its
planned device as it arrives. Which layers are swapped was fixed by the plan
(quant_targets), so the plan's sizes and the model always agree.
"""
from __future__ import annotations

import logging

from accelerate import init_empty_weights

from ..bnb import import_bitsandbytes
from ..context import LoadContext
from ..dtypes import policy_dtype

log = logging.getLogger(__name__)


def quantize(ctx: LoadContext) -> None:
    plan = ctx.require("plan", "quantize", "plan")
    model = ctx.model
    quant = ctx.quantization
    method = quant.get("method", "none")
    if method == "none":
        ctx.report["quantization"] = {"method": "none", "quantized": 0, "skipped": []}
        return
    bnb = import_bitsandbytes()
    for name in plan.quantized_modules:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, leaf)
        with init_empty_weights():
            new = _empty_module(bnb, old, quant, plan.int8_thresholds.get(name, quant.get("threshold")))
        new.requires_grad_(False)
        new.train(old.training)  # a fresh module is in training mode; bitsandbytes then skips LLM.int8 on the CPU
        setattr(parent, leaf, new)
    report = {
        "method": method,
        "quantized": len(plan.quantized_modules),
        "skipped": sorted(plan.skipped),
        "skipped_reasons": dict(sorted(plan.skipped.items())),
        "offloaded": quant.get("offloaded"),
        "unquantized_dtype": quant.get("unquantized_dtype"),
        "warnings": list(plan.warnings),
    }
    if method == "int8":
        report.update(threshold=quant["threshold"], thresholds=dict(plan.int8_thresholds))
    else:
        report.update(compute_dtype=quant["compute_dtype"], double_quant=quant["double_quant"], blocksize=quant["blocksize"])
    ctx.report["quantization"] = report
    log.info("%s: %d Linear layers quantized, %d skipped", method, len(plan.quantized_modules), len(plan.skipped))


def _empty_module(bnb, old, quant: dict, threshold):
    bias = old.bias is not None
    if quant["method"] == "int8":
        return bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=bias, has_fp16_weights=False,
                                   threshold=threshold)
    return bnb.nn.Linear4bit(old.in_features, old.out_features, bias=bias,
                             compute_dtype=policy_dtype(quant["compute_dtype"], "quantization.compute_dtype"),
                             compress_statistics=quant["double_quant"], quant_type=quant["method"])
