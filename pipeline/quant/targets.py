"""Which Linear layers are quantized (int8 or 4-bit), and why the others are skipped.

Decided once, by the plan stage (which must size quantized weights before any byte is
read); the quantize stage swaps exactly the modules the plan lists, so the two never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..names import matches
from .spec import SKIP, QuantSpec


@dataclass
class QuantSelection:
    modules: list[str]  # Linear layers to swap, in model order
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it stays as it is
    thresholds: dict[str, float] = field(default_factory=dict)  # per-module thresholds from overrides
    warnings: list[str] = field(default_factory=list)  # patterns that matched nothing


def select_quantized_modules(model: torch.nn.Module, spec: QuantSpec, *, tied_groups, keep_in_fp32) -> QuantSelection:
    """Which Linear-like layers to quantize, which to skip and why, and per-module thresholds."""
    tied = {name for group in tied_groups for name in group}
    head = _output_head_name(model)
    skip_modules = spec.skip_modules
    overrides = spec.override_rules
    used: set[str] = set()
    out = QuantSelection([])
    for name, module in model.named_modules():
        if type(module).__name__ == "Conv1D":
            out.skipped[name] = "Conv1D (GPT-2 style) layers are not converted yet"
            continue
        if not isinstance(module, torch.nn.Linear):
            continue
        reason = None
        if name == head:
            reason = "output head"
        elif f"{name}.weight" in tied:
            reason = "tied weight"
        elif any(matches(name, p) for p in keep_in_fp32 or ()):
            reason = "kept in fp32 by the model"
        hit = next((p for p in skip_modules if matches(name, p)), None)
        if hit is not None:
            used.add(hit)
            reason = reason or f"skip_modules pattern {hit!r}"
        rule = next((p for p in overrides if matches(name, p)), None)
        if rule is not None:
            used.add(rule)
            if overrides[rule] == SKIP:
                reason = reason or f"overrides pattern {rule!r}: skip"
            elif reason is None:
                out.thresholds[name] = overrides[rule]
        if reason:
            out.skipped[name] = reason
        else:
            out.modules.append(name)
    for key, patterns in (("skip_modules", skip_modules), ("overrides", overrides)):
        out.warnings += [f"quantization.{key} pattern {p!r} matches no Linear layer" for p in patterns if p not in used]
    return out


def _output_head_name(model: torch.nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)
