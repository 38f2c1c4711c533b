"""Checkpoints that are already quantized: loaded as saved, never quantized again.

Today: int8 checkpoints written by the save stage (the int8 weight, its fp32 row scales
`<module>.SCB`, and metadata saying which modules and thresholds).
"""

from __future__ import annotations

import json

import torch

from .spec import QuantSpec
from .targets import QuantSelection

METADATA_KEY = "model_loader"


def saved_quantization(checkpoint) -> dict | None:
    """The quantization a saved checkpoint carries ({"method": "int8", "modules": [...], ...}), else None."""
    raw = (checkpoint.metadata or {}).get(METADATA_KEY)
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        return None
    quant = info.get("quantization") or {}
    return quant if quant.get("method") == "int8" else None


def scale_key(module: str) -> str:
    return f"{module}.SCB"


def prequantized_selection(model, saved: dict, requested: QuantSpec) -> tuple[QuantSpec, QuantSelection]:
    """The spec and layers of a saved int8 checkpoint; the threshold is the run's (it acts at forward time)."""
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    modules = [m for m in linear if m in set(saved.get("modules") or [])]
    skipped = {n: "not int8 in the saved checkpoint" for n in linear if n not in modules}
    thresholds = {m: float(t) for m, t in (saved.get("thresholds") or {}).items() if m in modules}
    threshold = requested.threshold if requested.is_int8 else float(saved.get("threshold") or 0.0)
    cpu_matmul = requested.cpu_matmul if requested.is_int8 else "exact"
    spec = QuantSpec(method="int8", threshold=threshold, offloaded="int8", prequantized=True, cpu_matmul=cpu_matmul)
    return spec, QuantSelection(modules, skipped, thresholds)
