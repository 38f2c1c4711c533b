"""Stage 2: an exact memory plan from safetensors headers, before any weight byte is read.

Opens the checkpoint (headers only), chooses the quantized layers, reads the caps,
and calls planning.build_plan; writes plan.json (device map, per-device predicted
bytes, per-tensor placement and the inputs that determine them) and a table in the log.
"""

from __future__ import annotations

import logging

from ..checkpoint import open_checkpoint
from ..dtypes import DtypePolicy
from ..errors import UserError
from ..measure.auto_plan import choose_methods
from ..planning import build_plan
from ..planning.device_map import CapsTooSmall, ExplicitMap
from ..planning.document import plan_document, plan_table
from ..planning.fits import fit_hint
from ..quant.prequantized import prequantized_selection, read_saved_quantization
from ..quant.targets import QuantSelection, select_quantized_modules
from ..schema import CheckpointSchema, DeviceMapSchema, DtypeSchema
from ..sizes import MaxMemory, format_bytes
from .context import LoadContext

log = logging.getLogger(__name__)


def plan(
    ctx: LoadContext,
    *,
    dtype: str = DtypeSchema.name,
    dtype_overrides: dict | None = DtypeSchema.overrides,
    strategy: str = DeviceMapSchema.strategy,
    explicit_map: ExplicitMap = ExplicitMap(),
    max_memory: MaxMemory = MaxMemory(),
    allow_pickle: bool = CheckpointSchema.allow_pickle,
    allow_missing: bool = CheckpointSchema.allow_missing,
    output: str = "plan.json",
) -> None:
    """`explicit_map` and `max_memory` arrive parsed (engine/binding.py calls their `parse` when the stages are
    bound); the caps are resolved once, by the parallel strategy, and handed to build_plan."""
    model = ctx.require("model", "plan", "instantiate_empty")
    checkpoint = open_checkpoint(ctx.checkpoint_path, allow_pickle=allow_pickle)
    ctx.checkpoint = checkpoint
    ctx.report["checkpoint"] = checkpoint.summary()
    spec, selection = _quantization(ctx, checkpoint)
    policy = DtypePolicy(spec.unquantized_dtype or dtype, dict(dtype_overrides or {}))
    chosen = [spec, selection]

    def build(*placement):
        if chosen[0].method == "auto":  # per-module methods from measured sensitivities (measure/auto_plan.py)

            def caps_error(s, sel):  # only the caps the user gave bound the search
                return _caps_error(ctx, checkpoint, policy, s, sel, placement, bool(allow_missing))

            found = choose_methods(ctx, checkpoint, policy, *chosen, caps_error if max_memory else None)
            chosen[:], ctx.report["auto"] = found[:2], found[2]
        return _build(ctx, checkpoint, policy, *chosen, placement, dtype, bool(allow_missing))

    planned = ctx.parallel.plan(  # one process: the configured placement; tensor parallel: this rank's shards
        build, strategy=strategy, explicit_map=explicit_map, max_memory=max_memory, checkpoint=checkpoint, spec=spec, model=model,
    )  # fmt: skip
    spec = chosen[0]
    result = planned.plan
    ctx.plan, ctx.quant, ctx.dtype_policy = result, spec, policy
    doc = plan_document(
        result,
        checkpoint,
        model_class=type(model).__name__,
        dtype=dtype,
        dtype_overrides=policy.overrides,
        spec=spec,
        no_split=ctx.no_split,
        tied_groups=ctx.tied_groups,
    )
    ctx.report["plan"] = {
        "strategy": strategy,
        "max_memory": result.max_memory,
        "device_map": result.device_map,
        "predicted_bytes": result.predicted_bytes,
    }
    doc.update(planned.document)
    if "auto" in ctx.report:
        doc["auto"] = ctx.report["auto"]
    ctx.report.update(planned.report)
    ctx.artifacts[output] = doc  # the engine writes it into the run directory
    _log_plan(result, strategy)


def _build(ctx: LoadContext, checkpoint, policy, spec, selection, placement, dtype: str, allow_missing: bool):
    """build_plan; caps that cannot hold the model end in exit 2 naming the keys that would make it fit."""
    try:
        return _placed(ctx, checkpoint, policy, spec, selection, placement, allow_missing)
    except CapsTooSmall as e:
        parts = dict(tied_groups=ctx.tied_groups, keep_in_fp32=ctx.keep_in_fp32)
        caps = placement[2]
        hint = fit_hint(ctx.model, checkpoint, dtype=dtype, overrides=policy.overrides, spec=spec, caps=caps, **parts)
        raise UserError(f"{e}; {hint}") from None


def _caps_error(ctx: LoadContext, checkpoint, policy, spec, selection, placement, allow_missing: bool) -> str | None:
    """Why this quantization does not fit the caps (one line), or None when it does: quantization=auto's test."""
    try:
        _placed(ctx, checkpoint, policy, spec, selection, placement, allow_missing)
    except CapsTooSmall as e:
        return str(e)
    return None


def _placed(ctx: LoadContext, checkpoint, policy, spec, selection, placement, allow_missing: bool):
    placed, explicit_map, caps = placement
    return build_plan(
        ctx.model,
        checkpoint,
        policy=policy,
        spec=spec,
        selection=selection,
        no_split=ctx.no_split,
        strategy=placed,
        explicit_map=explicit_map,
        max_memory=caps,
        allow_missing=allow_missing,
        tied_groups=ctx.tied_groups,
        keep_in_fp32=ctx.keep_in_fp32,
    )


def _quantization(ctx: LoadContext, checkpoint):
    """The effective spec and layers: a checkpoint that is already quantized decides its own; else the config's."""
    saved = read_saved_quantization(checkpoint, ctx.model_config)
    if saved is not None:  # pre-quantized (transformers' save_pretrained or ours): loaded as saved
        spec, selection = prequantized_selection(ctx.model, checkpoint, saved, ctx.quant)
        log.info("the checkpoint is already %s (%s): loaded as saved", spec.method, saved.origin)
        for warning in selection.warnings:
            log.warning(warning)
        return spec, selection
    if not ctx.quant.enabled:
        return ctx.quant, QuantSelection([])
    selection = select_quantized_modules(
        ctx.model, ctx.quant, tied_groups=ctx.tied_groups, keep_in_fp32=ctx.keep_in_fp32
    )
    for warning in selection.warnings:
        log.warning(warning)
    return ctx.quant, selection


def _log_plan(result, strategy: str) -> None:
    if result.predicted_bytes.get("disk"):
        log.warning("the plan offloads %s to disk", format_bytes(result.predicted_bytes["disk"]))
    log.info("plan (%s):\n%s", strategy, plan_table(result))
    if result.missing:
        log.warning(
            "the checkpoint has no tensor for %d model parameters (initialised, checkpoint.allow_missing), first %s",
            len(result.missing),
            result.missing[0],
        )
    if result.unexpected:
        log.warning(
            "%d checkpoint tensors match no model parameter, first %s", len(result.unexpected), result.unexpected[0]
        )
