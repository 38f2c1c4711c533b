"""Checkpoints that are already quantized: loaded as saved, never quantized again.

The format (quant/formats/) says which checkpoint weights are quantized and where their stats lie; here that
becomes the run's spec and layers, in model names. The method is the checkpoint's; what the run's
`quantization=` may say and which forward-time settings it keeps: docs/quantization.md, "Pre-quantized
checkpoints".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..errors import UserError
from ..hf.conversions import map_keys
from .formats import SavedQuantization, read_saved_quantization
from .spec import FOUR_BIT, QuantSpec
from .targets import QuantSelection

__all__ = ["SavedSelection", "prequantized_selection", "read_saved_quantization"]


@dataclass
class SavedSelection(QuantSelection):
    """The layers a checkpoint holds quantized, and each weight's stats keys (model weight name -> stat -> key)."""

    stats: dict[str, dict[str, str]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # weight name -> (out, in), as bnb holds it
    stats_keys: set[str] = field(default_factory=set)  # every stats key: used by its weight, never unexpected


def prequantized_selection(
    model, checkpoint, saved: SavedQuantization, requested: QuantSpec
) -> tuple[QuantSpec, SavedSelection]:
    """The spec and layers of a pre-quantized checkpoint; UserError when the run asks for another method.

    Saved weight keys reach model names through the same mapping the planner uses (transformers' renames).
    """
    _refuse_contradiction(saved, requested)
    same = requested.enabled and requested.method in _saved_kinds(saved)  # the run names a method it holds
    threshold, compute_dtype = _forward_settings(saved, requested)
    spec = QuantSpec(
        method=saved.method,
        threshold=threshold,
        compute_dtype=compute_dtype,
        double_quant=saved.double_quant,
        blocksize=saved.blocksize,
        offloaded=saved.method,
        unquantized_dtype=requested.unquantized_dtype if same else None,
        prequantized=True,
        cpu_matmul=requested.cpu_matmul,  # how int8 multiplies on a CPU is the run's choice, not the checkpoint's
        cpu_numerics=requested.cpu_numerics,
    )
    names = dict(model.named_parameters(remove_duplicate=False))
    to_model = map_keys(model, {k: checkpoint.tensors[k] for k in saved.weights}, names).renamed
    modules_of = {w.rpartition(".")[0]: k.rpartition(".")[0] for k, w in to_model.items()}
    layers = dict(model.named_modules())
    modules, skipped = [], {}
    for name, module in layers.items():
        if name in modules_of:
            _check_layer(name, module, saved, modules_of[name])
            modules.append(name)
        elif isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            skipped[name] = f"not {saved.kinds} in the saved checkpoint"
    unmatched = sorted(set(saved.weights) - set(to_model))
    if unmatched:
        raise UserError(
            f"{saved.origin}: quantized tensor {unmatched[0]!r} matches no model weight "
            f"({len(unmatched)} such); the checkpoint does not match config.json"
        )
    selection = SavedSelection(
        modules,
        skipped,
        {m: saved.thresholds[modules_of[m]] for m in modules if modules_of[m] in saved.thresholds},
        _ignored_settings(requested) if same else [],
        stats={f"{m}.weight": saved.weights[f"{modules_of[m]}.weight"] for m in modules},
        shapes={f"{m}.weight": _bnb_shape(layers[m]) for m in modules},
        stats_keys=saved.stats_keys,
    )
    if saved.methods:  # a saved mixed plan: each module its saved method, by its exact model name
        spec = replace(spec, methods=tuple((m, saved.methods[modules_of[m]]) for m in modules))
    return spec, selection


def _saved_kinds(saved: SavedQuantization) -> set[str]:
    return set(saved.methods.values()) or {saved.method}


def _forward_settings(saved: SavedQuantization, requested: QuantSpec) -> tuple[float, str]:
    """The int8 threshold and the 4-bit compute dtype (they act at forward time): the run's where the run
    uses that kind and the checkpoint holds it, else the checkpoint's."""
    if saved.methods:
        run = {requested.method, *(m for _, m in requested.methods)} if requested.enabled else set()
        held = run & _saved_kinds(saved)
        int8, four = "int8" in held, bool(held & set(FOUR_BIT))
    else:
        four = requested.method == saved.method
        int8 = four and saved.method == "int8"
    threshold = requested.threshold if int8 else saved.threshold
    return threshold, (requested.compute_dtype if four else saved.compute_dtype) or "fp32"


def _refuse_contradiction(saved: SavedQuantization, requested: QuantSpec) -> None:
    if requested.enabled and requested.method not in _saved_kinds(saved):
        raise UserError(
            f"quantization={requested.method}: the checkpoint is already {saved.kinds} ({saved.origin}) and loads "
            f"as saved; use quantization={saved.method} (or quantization=none), or load an unquantized checkpoint"
        )


def _bnb_shape(module) -> tuple[int, ...]:
    """The (out, in) weight bitsandbytes holds: a Linear's own, a Conv1D's (stored (in, out)) transposed."""
    shape = tuple(module.weight.shape)
    return shape if isinstance(module, torch.nn.Linear) else shape[::-1]


def _check_layer(name: str, module, saved: SavedQuantization, saved_name: str) -> None:
    if not (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
        raise UserError(
            f"{saved.origin}: {name} is saved {saved.methods.get(saved_name, saved.method)} but the model's {name} is a "
            f"{type(module).__name__}, not a Linear or Conv1D; loading it quantized is not supported"
        )


def _ignored_settings(requested: QuantSpec) -> list[str]:
    """Layer choices of the run that a saved checkpoint has already made (said once, as a warning)."""
    out = []
    if requested.methods:
        out.append("quantization.methods: ignored, the checkpoint's layers load with the methods they were saved with")
    if requested.skip_modules or any(v == "skip" for _, v in requested.overrides):
        out.append("quantization.skip_modules/overrides skip: ignored, the checkpoint's layers are quantized as saved")
    if requested.offloaded == "keep":
        out.append(
            "quantization.offloaded=keep: ignored, saved layers have no unquantized weights; those the plan puts on "
            "the CPU stay quantized and run there"
        )
    return out
