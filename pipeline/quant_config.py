"""The quantization config node, checked and normalised once (numbers may arrive as ints or strings)."""
from __future__ import annotations

from .dtypes import POLICY_DTYPES
from .errors import UserError

METHODS = ("none", "int8", "nf4", "fp4")
FOUR_BIT = ("nf4", "fp4")
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


def normalize_quantization(node) -> dict:
    node = dict(node or {})
    method = str(node.get("method", "none")).lower()
    if method not in METHODS:
        raise UserError(f"quantization.method: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "none":
        return {"method": "none"}
    out = {"method": method}
    if method == "int8":
        out["threshold"] = _threshold(node.get("threshold", 6.0), "quantization.threshold")
    else:
        out["compute_dtype"] = _dtype(node.get("compute_dtype", "bf16"), "quantization.compute_dtype", allow_null=False)
        out["double_quant"] = _bool(node.get("double_quant", True), "quantization.double_quant")
        out["blocksize"] = _blocksize(node.get("blocksize", 64))
    skips = node.get("skip_modules") or []
    out["skip_modules"] = [str(s) for s in ([skips] if isinstance(skips, str) else skips)]
    out["overrides"] = _overrides(node.get("overrides"), method)
    offloaded = str(node.get("offloaded", method)).lower()
    if offloaded not in (method, "keep"):
        raise UserError(f"quantization.offloaded: {offloaded!r} is not valid with quantization={method}; "
                        f"use {method} (quantize CPU-planned layers, run them on the CPU) or keep (leave them unquantized)")
    out["offloaded"] = offloaded
    out["unquantized_dtype"] = _dtype(node.get("unquantized_dtype"), "quantization.unquantized_dtype", allow_null=True)
    return out


def _threshold(raw, key: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise UserError(f"{key}: {raw!r} is not a number; use e.g. {key}=6.0") from None
    if value < 0 or value != value:
        raise UserError(f"{key}: {raw} is negative; use 0 (no outlier path) or a positive value such as 6.0")
    return value


def _overrides(node, method: str) -> dict:
    overrides = {}
    for pattern, value in dict(node or {}).items():
        if str(value).lower() == "skip":
            overrides[str(pattern)] = "skip"
            continue
        if method != "int8":
            raise UserError(f"quantization.overrides.{pattern}: {value!r}; with quantization={method} an override "
                            f"can only be skip (thresholds are LLM.int8's)")
        try:
            t = float(value)
        except (TypeError, ValueError):
            t = -1.0
        if t < 0 or t != t:
            raise UserError(f"quantization.overrides.{pattern}: {value!r} is not a threshold; use a number >= 0 or skip")
        overrides[str(pattern)] = t
    return overrides


def _dtype(raw, key: str, *, allow_null: bool):
    if raw is None or str(raw).lower() in ("null", "none", "auto"):
        if allow_null:
            return None
        raise UserError(f"{key}: give a dtype: one of fp32, fp16, bf16")
    name = str(raw).lower()
    if name not in POLICY_DTYPES:
        raise UserError(f"{key}: unknown dtype {raw!r}; choose one of fp32, fp16, bf16" + (" or null" if allow_null else ""))
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(name, name)


def _bool(raw, key: str) -> bool:
    if isinstance(raw, bool):
        return raw
    raise UserError(f"{key}: {raw!r} is not true or false")


def _blocksize(raw) -> int:
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = -1
    if value not in BLOCKSIZES:
        raise UserError(f"quantization.blocksize: {raw!r}; choose one of {', '.join(map(str, BLOCKSIZES))}")
    return value
