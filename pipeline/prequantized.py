"""Checkpoints written by the save stage: already int8, with their scales and how they were made."""
from __future__ import annotations

import json

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
