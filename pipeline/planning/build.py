"""`build_plan`: the whole plan from the skeleton and checkpoint headers, pure (no I/O, no bytes read).

Steps, in order: size every tensor with the chosen quantized layers; make the device
map over those sizes; demote quantized layers that land where they cannot stay
quantized (planning/offload_policy.py) and size again; put buffers of streamed
modules on the execution device (where accelerate keeps them); check the caps.
"""

from __future__ import annotations

import functools
from dataclasses import replace

from ..dtypes import DtypePolicy
from ..errors import UserError
from ..quant.sizes import saved_size
from ..quant.spec import QuantSpec
from ..quant.targets import QuantSelection
from . import offload_policy
from .device_map import assign_devices, check_caps, compute_device_map
from .plan import Plan
from .tensors import TensorPlan, plan_tensors


def build_plan(
    model,
    checkpoint,
    *,
    policy: DtypePolicy,
    spec: QuantSpec,
    selection: QuantSelection,
    tied_groups,
    keep_in_fp32,
    no_split,
    strategy: str,
    explicit_map: dict | None,
    max_memory: dict[str, int],
    main_device: str | None = None,
    assemble_from_disk: bool = False,
) -> Plan:
    """The plan for `model` from `checkpoint`'s headers; `main_device` overrides the execution device.

    `assemble_from_disk`: tensors built from several checkpoint tensors may be planned on disk
    (the streamed reference assembles them at forward time, loading/offload.py); else exit 2.
    """
    saved = getattr(selection, "stats", {})  # pre-quantized: weight name -> its stats keys
    sized = functools.partial(
        plan_tensors,
        model,
        checkpoint,
        policy=policy,
        keep_in_fp32=keep_in_fp32,
        tied_groups=tied_groups,
        spec=spec,
        transposed=selection.transposed,
        saved=_saved_sizes(checkpoint, selection),
    )
    planned = sized(quantized_modules=selection.modules)
    dmap = compute_device_map(
        model, planned.tensors, strategy=strategy, explicit=explicit_map, max_memory=max_memory, no_split=no_split
    )
    tensors = assign_devices(planned.tensors, dmap)
    main = main_device or offload_policy.main_device(t.device for t in tensors.values())
    modules, skipped, tensors = _demote_offloaded(tensors, selection, spec, main, resize=sized, dmap=dmap)
    tensors = _buffers_on_execution_device(tensors, modules, main)
    plan = Plan(
        strategy=strategy,
        max_memory=max_memory,
        device_map=dmap,
        tensors=tensors,
        key_map=planned.key_map,
        unexpected=[k for k in planned.unexpected if k not in getattr(selection, "stats_keys", ())],
        missing=planned.missing,
        tied_duplicates=planned.tied_duplicates,
        quantized_modules=modules,
        skipped=skipped,
        int8_thresholds={m: t for m, t in selection.thresholds.items() if m in modules},
        warnings=list(selection.warnings),
        saved_stats={w: saved[w] for w in (f"{m}.weight" for m in modules) if w in saved},
    )
    _check_fits(plan, checkpoint, max_memory, assemble_from_disk)
    return plan


def _demote_offloaded(tensors, selection, spec: QuantSpec, main: str, *, resize, dmap):
    """Quantized layers placed where they cannot stay quantized (disk; the CPU with offloaded=keep)
    leave the quantized set and are sized again: (modules, skipped with reasons, tensors)."""
    modules, skipped = list(selection.modules), dict(selection.skipped)
    demoted = offload_policy.demoted_modules(tensors, modules, keep_offloaded=spec.offloaded == "keep", main=main)
    if not demoted:
        return modules, skipped, tensors
    _refuse_demoting_saved(spec, demoted, tensors)
    modules = [m for m in modules if m not in demoted]
    skipped.update(demoted)
    return modules, skipped, assign_devices(resize(quantized_modules=modules).tensors, dmap)


def _saved_sizes(checkpoint, selection) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Pre-quantized weights -> (bytes of their saved stats, the (out, in) shape bitsandbytes holds)."""
    stats = getattr(selection, "stats", {})
    return {w: (saved_size(checkpoint, s), selection.shapes[w]) for w, s in stats.items()}


def _check_fits(plan: Plan, checkpoint, max_memory: dict[str, int], assemble_from_disk: bool) -> None:
    check_caps(plan.predicted_bytes, max_memory)
    fused = (t for t in plan.tensors.values() if t.conversion and t.device == "disk" and not assemble_from_disk)
    on_disk = next(fused, None)
    if on_disk is not None:
        raise UserError(
            f"memory.max_memory: {on_disk.name} is assembled from {len(on_disk.conversion.sources)} checkpoint "
            f"tensors ({on_disk.conversion.ops}) and cannot be read in place from disk; raise the caps so that "
            f"its module ({on_disk.name.rpartition('.')[0]}) fits on a GPU or the CPU"
        )
    if checkpoint.format == "pickle" and plan.predicted_bytes.get("disk"):
        raise UserError(
            "memory.max_memory: disk offload reads tensors in place from safetensors files; "
            "this checkpoint is a pickle: convert it to safetensors or raise the caps"
        )


def _refuse_demoting_saved(spec: QuantSpec, demoted: dict[str, str], tensors) -> None:
    if spec.prequantized:
        first = next(iter(demoted))
        raise UserError(
            f"memory.max_memory: {first} is saved as {spec.method} and would be offloaded to "
            f"{tensors[f'{first}.weight'].device}; saved {spec.method} layers run on a GPU or the CPU: raise the caps"
        )


def _buffers_on_execution_device(tensors: dict[str, TensorPlan], modules, main: str) -> dict[str, TensorPlan]:
    """accelerate keeps the buffers of streamed (offloaded, not CPU-executed) modules on the execution device."""
    streamed = offload_policy.offloaded_devices(main)
    if offload_policy.runs_on_cpu(tensors, modules, main):
        streamed -= {"cpu"}
    return {
        n: replace(t, device=main) if t.device in streamed and t.kind == "buffer" else t for n, t in tensors.items()
    }
