"""Which Linear layers LLM.int8 replaces, and why the others are skipped.

Shared by plan (which must size int8 weights before any byte is read) and
quantize (which swaps the modules), so the two can never disagree.
"""
from __future__ import annotations

import torch

from .module_names import matches


def select_int8_modules(model: torch.nn.Module, *, tied_groups, keep_in_fp32, skip_modules) -> tuple[list[str], dict[str, str]]:
    """(names to quantize, {skipped name: reason}) over the model's Linear-like layers."""
    tied = {name for group in tied_groups for name in group}
    head = _output_head_name(model)
    quantize: list[str] = []
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "Conv1D":
            skipped[name] = "Conv1D (GPT-2 style) layers are not converted yet"
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
        else:
            hit = next((p for p in skip_modules or () if matches(name, p)), None)
            if hit is not None:
                reason = f"skip_modules pattern {hit!r}"
        if reason:
            skipped[name] = reason
        else:
            quantize.append(name)
    return quantize, skipped


def _output_head_name(model: torch.nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)
