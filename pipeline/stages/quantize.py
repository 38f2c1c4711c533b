"""Stage 3: swap the planned Linear layers for bitsandbytes modules (LLM.int8 or 4-bit), still empty.

The modules stay on the meta device; load_shards quantizes each weight on its planned
device as it arrives. Which layers are swapped was fixed by the plan, so the plan's
sizes and the model always agree.
"""

from __future__ import annotations

import logging

from accelerate import init_empty_weights

from ..quant.bnb import empty_module
from ..quant.cpu_numerics import int8_on_cpu
from ..quant.spec import FOUR_BIT
from .context import LoadContext

log = logging.getLogger(__name__)


def quantize(ctx: LoadContext) -> None:
    plan = ctx.require("plan", "quantize", "plan")
    spec = ctx.quant
    if not spec.enabled:
        ctx.report["quantization"] = {"method": "none", "quantized": 0, "skipped": []}
        return
    for name in plan.quantized_modules:
        parent_name, _, leaf = name.rpartition(".")
        parent = ctx.model.get_submodule(parent_name) if parent_name else ctx.model
        old = getattr(parent, leaf)
        with init_empty_weights():
            new = empty_module(old, spec.for_module(name), plan.int8_thresholds.get(name))
        new.requires_grad_(False)
        new.train(old.training)  # a fresh module is in training mode; bitsandbytes then skips LLM.int8 on the CPU
        setattr(parent, leaf, new)
    report = {
        "method": spec.method,
        "quantized": len(plan.quantized_modules),
        "skipped": sorted(plan.skipped),
        "skipped_reasons": dict(sorted(plan.skipped.items())),
        "offloaded": spec.offloaded,
        "unquantized_dtype": spec.unquantized_dtype,
        "warnings": list(plan.warnings),
    }
    if spec.methods:  # a mixed plan (quantization.methods or auto): each module's method
        report["methods"] = {m: plan.tensors[f"{m}.weight"].quantized for m in plan.quantized_modules}
    if spec.prequantized:
        report["prequantized"] = True  # loaded as saved (docs/quantization.md, pre-quantized checkpoints)
    if spec.is_int8:
        on_cpu = int8_on_cpu(plan.tensors.values())  # validate measures under cpu_numerics (quant/cpu_numerics.py)
        report.update(
            threshold=spec.threshold,
            thresholds=dict(plan.int8_thresholds),
            cpu_matmul=spec.cpu_matmul,
            cpu_numerics=spec.cpu_numerics if on_cpu else None,  # None: no int8 layer runs on the CPU
        )
    if not spec.is_int8 or any(m in FOUR_BIT for m in report.get("methods", {}).values()):
        report.update(compute_dtype=spec.compute_dtype, double_quant=spec.double_quant, blocksize=spec.blocksize)
    ctx.report["quantization"] = report
    log.info("%s: %d Linear layers quantized, %d skipped", spec.method, len(plan.quantized_modules), len(plan.skipped))
