"""A saved mixed plan (int8 and nf4/fp4 modules side by side): our own `quantization_config`, version 1.

transformers' BitsAndBytesConfig holds one method plus skipped modules, so a plan with several methods cannot
be written in its format. The tensors are still what bitsandbytes serialises for each module's kind
(bnb_keys.py); config.json says which module holds which. The format, and what transformers does with it
(warns, then fails on the packed 4-bit shapes): docs/quantization.md, "Saving a mixed plan".
"""

from __future__ import annotations

import math
import os

from ...errors import UserError
from ..spec import BLOCKSIZES, FOUR_BIT, QuantSpec
from .bnb_keys import QUANT_STATE, SavedQuantization, four_bit_weights, int8_weights
from .hf_config import DTYPE_NAMES, TORCH_NAMES, quantization_config_dict

QUANT_METHOD = "model_loader_mixed"
FORMAT_VERSION = 1
SAVED_METHODS = ("int8", *FOUR_BIT)


def is_mixed(qc: dict | None) -> bool:
    return bool(qc) and str(qc.get("quant_method")) == QUANT_METHOD


def mixed_quantization_config(spec: QuantSpec, methods: dict[str, str], thresholds: dict, skip_modules) -> dict:
    """The quantization_config of a mixed plan; `methods` and `thresholds` under checkpoint module names (the
    thresholds of modules that are not int8 are left out)."""
    used = set(methods.values())
    thresholds = {m: t for m, t in thresholds.items() if methods.get(m) == "int8"}
    out: dict = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "method": spec.method,
        "methods": dict(sorted(methods.items())),
        "skip_modules": sorted(skip_modules),
    }
    if "int8" in used:
        out["int8"] = {"threshold": spec.threshold, "thresholds": dict(sorted(thresholds.items()))}
    if used & set(FOUR_BIT):
        out["4bit"] = {
            "compute_dtype": TORCH_NAMES[spec.compute_dtype],
            "double_quant": spec.double_quant,
            "blocksize": spec.blocksize,
        }
    return out


def from_mixed_config(checkpoint, config) -> SavedQuantization | None:
    """A saved mixed plan, checked against the checkpoint's tensors; None when config.json holds another format."""
    qc = quantization_config_dict(config)
    if not is_mixed(qc):
        return None
    where = f"{os.path.join(checkpoint.directory, 'config.json')} quantization_config"
    _check_version(qc.get("format_version"), where)
    methods = _methods(qc.get("methods"), where)
    base = qc.get("method")
    if base not in SAVED_METHODS:
        raise UserError(f"{where}.method: {base!r} is not one of {', '.join(SAVED_METHODS)}; re-save the model")
    used = set(methods.values())
    int8 = _section(qc, "int8", where) if "int8" in used else {}
    four = _section(qc, "4bit", where) if used & set(FOUR_BIT) else {}
    return SavedQuantization(
        base,
        where,
        _weights(checkpoint, methods, where),
        threshold=_number(int8.get("threshold", 6.0), f"{where}.int8.threshold"),
        compute_dtype=_compute_dtype(four.get("compute_dtype", "float32"), f"{where}.4bit.compute_dtype"),
        double_quant=_flag(four.get("double_quant", False), f"{where}.4bit.double_quant"),
        blocksize=_blocksize(four.get("blocksize", BLOCKSIZES[0]), f"{where}.4bit.blocksize"),
        thresholds=_thresholds(int8.get("thresholds"), methods, f"{where}.int8.thresholds"),
        config=qc,
        methods=methods,
    )


def _check_version(version, where: str) -> None:
    if type(version) is not int or version != FORMAT_VERSION:
        raise UserError(
            f"{where}.format_version: {version!r} is not a version this loader reads ({FORMAT_VERSION}); "
            "load it with the loader that saved it, or re-save the model"
        )


def _methods(raw, where: str) -> dict[str, str]:
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}.methods: {raw!r} is not a mapping of module -> int8/nf4/fp4; re-save the model")
    for module, method in raw.items():
        if method not in SAVED_METHODS:
            raise UserError(
                f"{where}.methods.{module}: {method!r} is not a method this loader reads "
                f"({', '.join(SAVED_METHODS)}); re-save the model"
            )
    return {str(m): str(k) for m, k in raw.items()}


def _section(qc: dict, name: str, where: str) -> dict:
    """The settings of one kind (`int8`, `4bit`), required when a module of that kind is saved."""
    value = qc.get(name)
    if not isinstance(value, dict):
        raise UserError(f"{where}.{name}: {value!r} is not the {name} settings of the modules saved so; re-save")
    return value


def _weights(checkpoint, methods: dict[str, str], where: str) -> dict[str, dict[str, str]]:
    """Checkpoint weight key -> its stats keys; each listed module holds its method's tensors, and no others."""
    int8, four = int8_weights(checkpoint.tensors), four_bit_weights(checkpoint.tensors)
    out: dict[str, dict[str, str]] = {}
    for module, method in methods.items():
        weight = f"{module}.weight"
        stats = int8.get(weight) if method == "int8" else four.get(weight)
        wanted = f"{module}.SCB" if method == "int8" else f"{weight}.{QUANT_STATE}{method}"
        if not stats or wanted not in stats.values():
            raise UserError(
                f"{where}.methods.{module}: says {method} but the checkpoint has no {wanted}; "
                "the directory does not match its config.json: re-save the model"
            )
        out[weight] = stats
    extra = sorted((set(int8) | set(four)) - set(out))
    if extra:
        raise UserError(
            f"{where}.methods: {extra[0]} is saved quantized but not listed ({len(extra)} such); "
            "the directory does not match its config.json: re-save the model"
        )
    return out


def _number(raw, key: str) -> float:
    value = raw if isinstance(raw, (int, float)) and not isinstance(raw, bool) else -1.0
    if not value >= 0 or math.isinf(value):
        raise UserError(f"{key}: {raw!r} is not a threshold (a number >= 0); re-save the model")
    return float(value)


def _thresholds(raw, methods: dict[str, str], key: str) -> dict[str, float]:
    if raw is not None and not isinstance(raw, dict):
        raise UserError(f"{key}: {raw!r} is not a mapping of module -> threshold; re-save the model")
    out = {}
    for module, value in (raw or {}).items():
        if methods.get(module) != "int8":
            raise UserError(f"{key}.{module}: not an int8 module of quantization_config.methods; re-save the model")
        out[str(module)] = _number(value, f"{key}.{module}")
    return out


def _compute_dtype(raw, key: str) -> str:
    name = str(raw).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise UserError(f"{key}: {raw!r} is not one of {', '.join(DTYPE_NAMES)}; re-save the model")
    return DTYPE_NAMES[name]


def _flag(raw, key: str) -> bool:
    if not isinstance(raw, bool):
        raise UserError(f"{key}: {raw!r} is not true or false; re-save the model")
    return raw


def _blocksize(raw, key: str) -> int:
    if type(raw) is not int or raw not in BLOCKSIZES:
        raise UserError(f"{key}: {raw!r} is not one of {', '.join(map(str, BLOCKSIZES))}; re-save the model")
    return raw
