"""int8 checkpoints written by our save stage before it wrote config.json's quantization_config.

Their safetensors metadata `model_loader` says how they were made; today's saves write
it too, beside quantization_config, for what transformers has no field for: per-module
thresholds (`quantization.overrides`).
"""

from __future__ import annotations

import json

from .bnb_keys import SavedQuantization, int8_weights

METADATA_KEY = "model_loader"


def our_metadata(checkpoint) -> dict:
    """The `quantization` part of our metadata ({} when there is none or it is unreadable)."""
    raw = (checkpoint.metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        info = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        return {}
    return info.get("quantization") or {} if isinstance(info, dict) else {}


def from_our_metadata(checkpoint) -> SavedQuantization | None:
    quant = our_metadata(checkpoint)
    if quant.get("method") != "int8":  # 4-bit saves always carry quantization_config
        return None
    thresholds = {str(m): float(t) for m, t in (quant.get("thresholds") or {}).items()}
    weights = int8_weights(checkpoint.tensors)
    if not weights:
        return None
    return SavedQuantization(
        "int8",
        f"{checkpoint.path} safetensors metadata {METADATA_KEY}",
        weights,
        threshold=float(quant.get("threshold") or 0.0),
        thresholds=thresholds,
    )
