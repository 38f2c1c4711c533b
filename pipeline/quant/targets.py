"""Which Linear layers are quantized (int8 or 4-bit), and why the others are skipped.

Decided once, by the plan stage (which must size quantized weights before any byte is read); the quantize
stage swaps exactly the modules the plan lists, so the two never disagree. The candidates and default skips
are transformers' bitsandbytes integration's (docs/quantization.md, "Which layers").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..hf.quantizers import leaves_unconverted
from ..names import matches
from .spec import KEEP, SKIP, QuantSpec


@dataclass
class QuantSelection:
    modules: list[str]  # Linear layers to swap, in model order
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it stays as it is
    thresholds: dict[str, float] = field(default_factory=dict)  # per-module thresholds from overrides
    warnings: list[str] = field(default_factory=list)  # patterns that matched nothing
    transposed: list[str] = field(default_factory=list)  # Conv1D modules among `modules`: weight stored (in, out)


def select_quantized_modules(model: torch.nn.Module, spec: QuantSpec, *, tied_groups, keep_in_fp32) -> QuantSelection:
    """Which Linear-like layers to quantize, which to skip and why, and per-module thresholds."""
    tied = {name for group in tied_groups for name in group}
    head = _output_head_name(model)
    last = _last_parameter_module(model)
    skip_modules = spec.skip_modules
    overrides = spec.override_rules
    used: set[str] = set()
    out = QuantSelection([])
    for name, module in model.named_modules():
        kind = candidate_kind(module)
        if kind is None:
            if isinstance(module, torch.nn.Linear):
                out.skipped[name] = (
                    f"{type(module).__name__} is a Linear subclass with its own forward (kept, as transformers does)"
                )
            continue
        reason = None
        if name == head:
            reason = "output head"
        elif f"{name}.weight" in tied:
            reason = "tied weight"
        elif name == last:
            reason = "the model's last module (transformers keeps it unquantized)"
        elif any(_declared(name, p) for p in keep_in_fp32 or ()):
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
        kept = next((p for p, m in spec.methods if matches(name, p)), None)
        if kept is not None:
            used.add(kept)
            if spec.method_of(name) == KEEP:
                reason = reason or f"methods pattern {kept!r}: keep"
        if reason:
            out.skipped[name] = reason
        else:
            out.modules.append(name)
            if kind == "conv1d":
                out.transposed.append(name)
    for key, patterns in (("skip_modules", skip_modules), ("overrides", overrides), ("methods", dict(spec.methods))):
        out.warnings += [f"quantization.{key} pattern {p!r} matches no Linear layer" for p in patterns if p not in used]
    return out


def candidate_kind(module: torch.nn.Module) -> str | None:
    """ "linear" or "conv1d" for what transformers' replace_with_bnb_linear converts, else None."""
    if type(module) is torch.nn.Linear:
        return "linear"
    if any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__):
        return "conv1d"
    return None


def _declared(name: str, pattern: str) -> bool:
    """A `_keep_in_fp32_modules` entry matches as transformers' should_convert_module matches it."""
    kept = leaves_unconverted(name, pattern)
    return matches(name, pattern) if kept is None else kept


def _last_parameter_module(model: torch.nn.Module) -> str | None:
    """transformers' get_keys_to_not_convert: the last parameter's name without `.weight`."""
    names = [n for n, _ in model.named_parameters()]
    return names[-1].removesuffix(".weight") if names else None


def _output_head_name(model: torch.nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)
