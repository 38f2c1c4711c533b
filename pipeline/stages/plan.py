"""Stage 2: an exact memory plan from safetensors headers, before any weight byte is read.

Writes plan.json (device map, per-device predicted bytes, per-tensor placement
and the inputs that determine them) and a readable table in the log. Same
inputs give a byte-identical plan.json.
"""
from __future__ import annotations

import logging
import os

from ..artifacts import write_json
from ..checkpoint import open_checkpoint
from ..context import LoadContext
from ..device_map import check_caps, compute_device_map, resolve_max_memory
from ..dtypes import dtype_name
from ..errors import UserError
from ..quant_targets import QuantSelection, select_quantized_modules
from ..offload import main_device, offloaded_devices, runs_on_cpu
from ..prequantized import saved_quantization, scale_key
from ..planning import Plan, assign_devices, plan_tensors
from ..quant_config import normalize_quantization
from ..sizes import format_bytes

log = logging.getLogger(__name__)


def plan(ctx: LoadContext, *, dtype: str = "auto", dtype_overrides: dict | None = None, strategy: str = "auto",
         device_map: dict | None = None, max_memory: dict | None = None, quantization: dict | None = None,
         allow_pickle: bool = False, output: str = "plan.json") -> None:
    model = ctx.require("model", "plan", "instantiate_empty")
    checkpoint = open_checkpoint(ctx.checkpoint_path, allow_pickle=allow_pickle)
    ctx.checkpoint = checkpoint
    ctx.report["checkpoint"] = checkpoint.summary()
    quant = normalize_quantization(quantization)
    selection = QuantSelection([])
    saved = saved_quantization(checkpoint)
    if saved is not None:  # written by the save stage: already int8, keep its layers; the threshold is ours
        quant, selection = _saved_selection(model, saved, quant)
    elif quant["method"] != "none":
        selection = select_quantized_modules(model, tied_groups=ctx.tied_groups, keep_in_fp32=ctx.keep_in_fp32,
                                             skip_modules=quant["skip_modules"], overrides=quant["overrides"])
        for warning in selection.warnings:
            log.warning(warning)
    load_dtype = quant.get("unquantized_dtype") or dtype  # what quantization leaves alone, and the reference

    def tensors_with(modules):
        return plan_tensors(model, checkpoint, dtype=load_dtype, overrides=dtype_overrides or {},
                            keep_in_fp32=ctx.keep_in_fp32, tied_groups=ctx.tied_groups, quantized_modules=modules,
                            quant=quant)

    quantized_modules, skipped = selection.modules, selection.skipped
    tensors, key_map, unexpected, missing, tied_dups = tensors_with(quantized_modules)
    caps = resolve_max_memory(max_memory) if strategy not in ("cpu", "explicit") or max_memory else {}
    dmap = compute_device_map(model, tensors, strategy=strategy, explicit=device_map, max_memory=caps,
                              no_split=ctx.no_split)
    assign_devices(tensors, dmap)
    result = Plan(strategy, caps, dmap, tensors, key_map, unexpected, missing, tied_dups, quantized_modules, skipped)
    offloaded = offloaded_devices(result)
    kept = offloaded if quant.get("offloaded") == "keep" else offloaded & {"disk"}
    demoted = [m for m in quantized_modules if tensors[f"{m}.weight"].device in kept]
    if demoted and saved is not None:
        raise UserError(f"memory.max_memory: {demoted[0]} is saved as int8 and would be offloaded to "
                        f"{tensors[f'{demoted[0]}.weight'].device}; saved int8 layers run on a GPU or the CPU: raise the caps")
    if demoted:  # offloaded layers that stay in their load dtype (quantization.offloaded=keep, or on disk)
        quantized_modules = [m for m in quantized_modules if m not in demoted]
        skipped.update({m: _demoted_reason(tensors[f"{m}.weight"].device) for m in demoted})
        tensors, *_ = tensors_with(quantized_modules)
        assign_devices(tensors, dmap)
        result = Plan(strategy, caps, dmap, tensors, key_map, unexpected, missing, tied_dups, quantized_modules, skipped)
    streamed = offloaded - ({"cpu"} if runs_on_cpu(result) else set())
    for t in result.tensors.values():
        if t.device in streamed and t.kind == "buffer":
            t.device = main_device(result)  # accelerate keeps buffers of offloaded modules on the execution device
    check_caps(result.predicted_bytes, caps)
    if checkpoint.format == "pickle" and result.predicted_bytes.get("disk"):
        raise UserError("memory.max_memory: disk offload reads tensors in place from safetensors files; "
                        "this checkpoint is a pickle: convert it to safetensors or raise the caps")
    if "disk" in result.predicted_bytes and result.predicted_bytes["disk"]:
        log.warning("the plan offloads %s to disk", format_bytes(result.predicted_bytes["disk"]))
    result.int8_thresholds = {m: t for m, t in selection.thresholds.items() if m in result.quantized_modules}
    if saved is not None:
        result.scales = {f"{m}.weight": scale_key(m) for m in result.quantized_modules}
        result.unexpected = [k for k in result.unexpected if k not in set(result.scales.values())]
    result.warnings = selection.warnings
    ctx.plan = result
    ctx.quantization = quant
    ctx.dtype_policy = (load_dtype, dict(dtype_overrides or {}))
    doc = plan_document(result, ctx, dtype=dtype, dtype_overrides=dtype_overrides, quant=quant)
    write_json(ctx.run_dir / output, doc)
    ctx.report["plan"] = {
        "strategy": strategy,
        "max_memory": caps,
        "device_map": dmap,
        "predicted_bytes": result.predicted_bytes,
    }
    log.info("plan (%s):\n%s", strategy, plan_table(result))
    if missing:
        log.warning("the checkpoint has no tensor for %d model parameters, first %s", len(missing), missing[0])
    if unexpected:
        log.warning("%d checkpoint tensors match no model parameter, first %s", len(unexpected), unexpected[0])


def _demoted_reason(device: str) -> str:
    if device == "disk":
        return "offloaded to disk (read in place from the checkpoint at forward time, so kept in its load dtype)"
    return f"offloaded to {device} with quantization.offloaded=keep"


def _saved_selection(model, saved: dict, quant: dict) -> tuple[dict, QuantSelection]:
    import torch

    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    modules = [m for m in linear if m in set(saved.get("modules") or [])]
    skipped = {n: "not int8 in the saved checkpoint" for n in linear if n not in modules}
    thresholds = {m: float(t) for m, t in (saved.get("thresholds") or {}).items() if m in modules}
    threshold = quant["threshold"] if quant["method"] == "int8" else float(saved.get("threshold") or 0.0)
    return ({"method": "int8", "threshold": threshold, "skip_modules": [], "overrides": {}, "offloaded": "int8",
             "unquantized_dtype": None, "prequantized": True},
            QuantSelection(modules, skipped, thresholds))


def plan_document(p: Plan, ctx: LoadContext, *, dtype, dtype_overrides, quant) -> dict:
    ck = ctx.checkpoint
    return {
        "inputs": {
            "checkpoint": {"path": ck.path, "files": [{"name": f, "bytes": os.path.getsize(f)} for f in ck.files]},
            "model_class": type(ctx.model).__name__,
            "dtype": dtype,
            "unquantized_dtype": quant.get("unquantized_dtype"),
            "dtype_overrides": dict(dtype_overrides or {}),
            "strategy": p.strategy,
            "max_memory": p.max_memory,
            "quantization": quant,
            "no_split_modules": ctx.no_split,
            "tied_groups": ctx.tied_groups,
        },
        "device_map": p.device_map,
        "predicted_bytes": p.predicted_bytes,
        "module_bytes": p.module_bytes(),
        "quantized_modules": p.quantized_modules,
        "skipped_modules": p.skipped,
        "missing_keys": p.missing,
        "unexpected_keys": p.unexpected,
        "tensors": {name: t.to_json() for name, t in sorted(p.tensors.items())},
    }


def plan_table(p: Plan) -> str:
    rows = [("device", "cap", "predicted", "tensors", "dtypes")]
    for dev, nbytes in p.predicted_bytes.items():
        ts = [t for t in p.tensors.values() if t.device == dev]
        dts = sorted({dtype_name(t.dtype) for t in ts})
        cap = p.max_memory.get(dev)
        rows.append((dev, format_bytes(cap) if cap is not None else "-", format_bytes(nbytes), str(len(ts)), ",".join(dts)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
