"""`build_plan`: the whole plan from the skeleton and checkpoint headers, pure (no I/O, no bytes read).

Steps, in order: size every tensor with the chosen quantized layers; make the device
map over those sizes; demote quantized layers that land where they cannot stay
quantized (planning/offload_policy.py) and size again; put buffers of streamed
modules on the execution device (where accelerate keeps them); check the caps.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import replace

from ..dtypes import DtypePolicy
from ..errors import UserError
from ..hf.modeling import initialised_when_missing
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
    explicit_map: Mapping[str, str] | None,
    max_memory: Mapping[str, int],
    main_device: str | None = None,
    assemble_from_disk: bool = False,
    allow_missing: bool = False,
) -> Plan:
    """The plan for `model` from `checkpoint`'s headers. `max_memory`: the resolved caps (sizes.Caps, {}: none);
    `assemble_from_disk`: fused tensors may be planned on disk (the streamed reference assembles them);
    `allow_missing`: tensors the checkpoint lacks are initialised, as transformers does."""
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
    selection, planned = _sized_selection(sized, selection, allow_missing)
    dmap = compute_device_map(
        model, planned.tensors, strategy=strategy, explicit_map=explicit_map, caps=max_memory, no_split=no_split
    )
    tensors = assign_devices(planned.tensors, dmap)
    main = main_device or offload_policy.main_device(t.device for t in tensors.values())
    _refuse_offloaded_tensor_entries(dmap, tensors, main)
    key = _placement_key(strategy)
    modules, skipped, tensors = _demote_offloaded(tensors, selection, spec, main, resize=sized, dmap=dmap, key=key)
    tensors = _buffers_on_execution_device(tensors, modules, main)
    plan = Plan(
        strategy=strategy,
        max_memory=dict(max_memory),
        device_map=dmap,
        tensors=tensors,
        key_map=planned.key_map,
        unexpected=[k for k in planned.unexpected if k not in getattr(selection, "stats_keys", ())],
        missing=planned.missing,
        missing_allowed=_check_missing(planned.missing, tensors, model, checkpoint, allow_missing),
        tied_duplicates=planned.tied_duplicates,
        quantized_modules=modules,
        skipped=skipped,
        int8_thresholds={m: t for m, t in selection.thresholds.items() if m in modules},
        warnings=list(selection.warnings),
        saved_stats={w: saved[w] for w in (f"{m}.weight" for m in modules) if w in saved},
    )
    _check_fits(plan, checkpoint, max_memory, assemble_from_disk)
    return plan


def _placement_key(strategy: str) -> str:
    """The key that decided where a tensor went: the user's map, or the caps the strategy filled."""
    return "device_map.map" if strategy == "explicit" else "memory.max_memory"


def _demote_offloaded(tensors, selection, spec: QuantSpec, main: str, *, resize, dmap, key: str):
    """Quantized layers placed where they cannot stay quantized (disk; the CPU with offloaded=keep)
    leave the quantized set and are sized again: (modules, skipped with reasons, tensors)."""
    modules, skipped = list(selection.modules), dict(selection.skipped)
    demoted = offload_policy.demoted_modules(tensors, modules, keep_offloaded=spec.offloaded == "keep", main=main)
    if not demoted:
        return modules, skipped, tensors
    _refuse_demoting_saved(spec, demoted, tensors, key)
    modules = [m for m in modules if m not in demoted]
    skipped.update(demoted)
    return modules, skipped, assign_devices(resize(quantized_modules=modules).tensors, dmap)


def _refuse_offloaded_tensor_entries(dmap: dict[str, str], tensors: dict[str, TensorPlan], main: str) -> None:
    """A parameter held directly by a split module cannot be offloaded: accelerate's hooks offload modules,
    so it would never be loaded (issue 29). Exit 2 at plan time instead."""
    offloaded = offload_policy.offloaded_devices(main)
    for name, dev in dmap.items():
        t = tensors.get(name)
        if t is not None and t.kind == "param" and dev in offloaded:
            parent = name.rpartition(".")[0] or "the model's root"
            raise UserError(
                f"memory.max_memory: {name} ({t.nbytes} bytes) is a parameter held directly by {parent}, which the "
                f"caps split across devices; accelerate offloads whole modules, so it cannot go to {dev}: raise "
                f"the cap of {main} by {t.nbytes} bytes, or map {parent} whole with device_map=explicit"
            )


def _sized_selection(sized, selection: QuantSelection, allow_missing: bool):
    """(selection, planned tensors); with allow_missing, layers whose weight is missing leave the selection."""
    planned = sized(quantized_modules=selection.modules)
    if allow_missing and any(f"{m}.weight" in planned.missing for m in selection.modules):
        selection = _unquantize_missing(selection, planned.missing)
        planned = sized(quantized_modules=selection.modules)
    return selection, planned


def _unquantize_missing(selection: QuantSelection, missing: list[str]) -> QuantSelection:
    """Layers whose weight the checkpoint lacks are initialised, not quantized (checkpoint.allow_missing)."""
    gone = [m for m in selection.modules if f"{m}.weight" in missing]
    skipped = dict(selection.skipped)
    skipped.update(dict.fromkeys(gone, "missing from the checkpoint: initialised (checkpoint.allow_missing)"))
    return replace(selection, modules=[m for m in selection.modules if m not in gone], skipped=skipped)


def _check_missing(missing: list[str], tensors, model, checkpoint, allow: bool) -> bool:
    """Model tensors without a source are exit 2 naming them and where they should be, unless allowed or all of
    them are ones transformers initialises itself (`_keys_to_ignore_on_load_missing`); True when initialised."""
    if not missing:
        return False
    ignore = initialised_when_missing(model)
    rest = [n for n in missing if not any(re.search(p, n) for p in ignore)]
    if rest and not allow:
        more = f" (and {len(rest) - 3} more)" if len(rest) > 3 else ""
        raise UserError(
            f"checkpoint: {len(rest)} model tensors have no source: {', '.join(rest[:3])}{more}; "
            f"{checkpoint.home_of_missing()}; or set checkpoint.allow_missing=true to initialise them as "
            f"transformers does (listed in report.json load.missing_keys)"
        )
    for name in missing:
        if tensors[name].device == "disk" or tensors[name].quantized:
            where = "would be quantized" if tensors[name].quantized else "is planned on disk"
            raise UserError(
                f"checkpoint.allow_missing: {name} has no source and {where}; only tensors in memory are initialised: "
                f"{'add its module to quantization.skip_modules' if tensors[name].quantized else 'raise the caps'}"
            )
    return True


def _saved_sizes(checkpoint, selection) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Pre-quantized weights -> (bytes of their saved stats, the (out, in) shape bitsandbytes holds)."""
    stats = getattr(selection, "stats", {})
    return {w: (saved_size(checkpoint, s), selection.shapes[w]) for w, s in stats.items()}


def _check_fits(plan: Plan, checkpoint, max_memory: Mapping[str, int], assemble_from_disk: bool) -> None:
    check_caps(plan.predicted_bytes, max_memory)
    fused = (t for t in plan.tensors.values() if t.conversion and t.device == "disk" and not assemble_from_disk)
    on_disk = next(fused, None)
    if on_disk is not None:
        module = on_disk.name.rpartition(".")[0]
        fix = (
            f"map its module ({module}) to a GPU or the CPU"
            if plan.strategy == "explicit"
            else f"raise the caps (or, with device_map=explicit, map it) so that its module ({module}) is on a GPU or the CPU"
        )
        raise UserError(
            f"{_placement_key(plan.strategy)}: {on_disk.name} is assembled from {len(on_disk.conversion.sources)} "
            f"checkpoint tensors ({on_disk.conversion.ops}) and cannot be read in place from disk; {fix}"
        )
    if checkpoint.format == "pickle" and plan.predicted_bytes.get("disk"):
        raise UserError(
            "memory.max_memory: disk offload reads tensors in place from safetensors files; "
            "this checkpoint is a pickle: convert it to safetensors or raise the caps"
        )


def _refuse_demoting_saved(spec: QuantSpec, demoted: dict[str, str], tensors, key: str) -> None:
    if spec.prequantized:
        first = next(iter(demoted))
        fix = "map it to a GPU or the CPU" if key == "device_map.map" else "raise the caps"
        raise UserError(
            f"{key}: {first} is saved as {spec.method} and would be offloaded to "
            f"{tensors[f'{first}.weight'].device}; saved {spec.method} layers run on a GPU or the CPU: {fix}"
        )


def _buffers_on_execution_device(tensors: dict[str, TensorPlan], modules, main: str) -> dict[str, TensorPlan]:
    """accelerate keeps the buffers of streamed (offloaded, not CPU-executed) modules on the execution device."""
    streamed = offload_policy.offloaded_devices(main)
    if offload_policy.runs_on_cpu(tensors, modules, main):
        streamed -= {"cpu"}
    return {
        n: replace(t, device=main) if t.device in streamed and t.kind == "buffer" else t for n, t in tensors.items()
    }
