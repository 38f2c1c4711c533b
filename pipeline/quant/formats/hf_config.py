"""config.json's `quantization_config` (bitsandbytes), read as transformers reads it and written as it writes it.

Reading: `load_in_8bit` means int8, `load_in_4bit` the `bnb_4bit_quant_type`; the tensors
beside each weight (bnb_keys.py) must agree, else the directory is refused at plan time.
Writing: transformers' own BitsAndBytesConfig(...).to_dict(), so that its from_pretrained
builds the same modules; `llm_int8_skip_modules` lists every layer left unquantized by
name, because transformers' default skips (head, tied and last modules) need not be ours.
"""

from __future__ import annotations

import math
import os

from ...errors import UserError
from ..spec import BLOCKSIZES, DTYPE_NAMES, QuantSpec
from .bnb_keys import SavedQuantization, four_bit_types, four_bit_weights, int8_weights

TORCH_NAMES = {v: k for k, v in DTYPE_NAMES.items()}


def quantization_config_dict(config) -> dict | None:
    """The transformers config's quantization_config as a plain dict (it may be a dict or a config object)."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    return dict(qc.to_dict() if hasattr(qc, "to_dict") else qc)


def from_quantization_config(checkpoint, config) -> SavedQuantization | None:
    """The saved quantization config.json declares, checked against the checkpoint's tensors; None without one."""
    qc = quantization_config_dict(config)
    if not qc:
        return None
    where = f"{os.path.join(checkpoint.directory, 'config.json')} quantization_config"
    method = _method(qc, where)
    if method == "int8":
        weights = int8_weights(checkpoint.tensors)
        if not weights:
            raise UserError(
                f"{where}: says load_in_8bit but the checkpoint has no <module>.SCB row scales; "
                f"its weights are not int8: remove quantization_config from config.json or re-save the model"
            )
        return SavedQuantization(
            "int8",
            where,
            weights,
            threshold=float(qc.get("llm_int8_threshold", SavedQuantization.threshold) or 0.0),
            config=qc,
        )
    weights = four_bit_weights(checkpoint.tensors)
    found = four_bit_types(weights)
    if found != {method}:
        seen = ", ".join(sorted(found)) or "no 4-bit quant_state tensors"
        raise UserError(
            f"{where}: says {method} but the checkpoint holds {seen}; "
            f"fix bnb_4bit_quant_type in config.json or re-save the model"
        )
    compute = str(qc.get("bnb_4bit_compute_dtype") or "float32").removeprefix("torch.")
    return SavedQuantization(
        method,
        where,
        weights,
        compute_dtype=DTYPE_NAMES.get(compute, "fp32"),
        double_quant=any("nested_absmax" in stats for stats in weights.values()),
        blocksize=_blocksize(checkpoint, weights),
        config=qc,
    )


def _method(qc: dict, where: str) -> str:
    kind = str(qc.get("quant_method", "bitsandbytes"))
    kind = getattr(qc.get("quant_method"), "value", kind)
    if kind != "bitsandbytes":
        raise UserError(
            f"{where}: quant_method {kind!r} is not supported (bitsandbytes int8 and 4-bit are); "
            f"load the unquantized model and quantize it here"
        )
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        return "int8"
    if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
        kind = str(qc.get("bnb_4bit_quant_type") or "fp4")
        if kind not in ("nf4", "fp4"):
            raise UserError(f"{where}: bnb_4bit_quant_type {kind!r} is unknown; it must be nf4 or fp4")
        return kind
    raise UserError(f"{where}: neither load_in_8bit nor load_in_4bit is true; set one or remove quantization_config")


def _blocksize(checkpoint, weights: dict[str, dict[str, str]]) -> int:
    """Values per absmax block, from the first weight's header sizes (the quant_state blob says it too)."""
    weight, stats = next(iter(weights.items()))
    numel = checkpoint.tensors[weight].nbytes * 2
    blocks = checkpoint.tensors[stats["absmax"]].numel if "absmax" in stats else 0
    return next((b for b in BLOCKSIZES if math.ceil(numel / b) == blocks), BLOCKSIZES[0])


def bnb_quantization_config(spec: QuantSpec, skip_modules) -> dict:
    """The quantization_config transformers writes for this spec: BitsAndBytesConfig(...).to_dict()."""
    from transformers import BitsAndBytesConfig

    skip = sorted(skip_modules)
    if spec.is_int8:
        config = BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=spec.threshold, llm_int8_skip_modules=skip or None
        )
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec.method,
            bnb_4bit_use_double_quant=spec.double_quant,
            bnb_4bit_compute_dtype=TORCH_NAMES[spec.compute_dtype],
            llm_int8_skip_modules=skip or None,
        )
    return config.to_dict()


def unconverted_modules(model, quantized) -> list[str]:
    """Layers transformers would convert (exactly nn.Linear, or Conv1D: replace_with_bnb_linear's rule)
    that are not quantized here; written as llm_int8_skip_modules so transformers leaves them alone."""
    import torch

    done = set(quantized)
    return [
        n
        for n, m in model.named_modules()
        if (type(m) is torch.nn.Linear or type(m).__name__ == "Conv1D") and n not in done
    ]
