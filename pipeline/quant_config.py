"""The quantization config node, checked and normalised once (threshold may arrive as an int)."""
from __future__ import annotations

from .errors import UserError

METHODS = ("none", "int8")


def normalize_quantization(node) -> dict:
    node = dict(node or {})
    method = str(node.get("method", "none")).lower()
    if method not in METHODS:
        raise UserError(f"quantization.method: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "none":
        return {"method": "none"}
    raw = node.get("threshold", 6.0)
    try:
        threshold = float(raw)
    except (TypeError, ValueError):
        raise UserError(f"quantization.threshold: {raw!r} is not a number; use e.g. quantization.threshold=6.0") from None
    if threshold < 0 or threshold != threshold:
        raise UserError(f"quantization.threshold: {raw} is negative; use 0 (no outlier path) or a positive value such as 6.0")
    skips = node.get("skip_modules") or []
    if isinstance(skips, str):
        skips = [skips]
    overrides = {}
    for pattern, value in dict(node.get("overrides") or {}).items():
        if str(value).lower() == "skip":
            overrides[str(pattern)] = "skip"
            continue
        try:
            t = float(value)
        except (TypeError, ValueError):
            t = -1.0
        if t < 0 or t != t:
            raise UserError(f"quantization.overrides.{pattern}: {value!r} is not a threshold; use a number >= 0 or skip")
        overrides[str(pattern)] = t
    return {"method": method, "threshold": threshold, "skip_modules": [str(s) for s in skips], "overrides": overrides}
