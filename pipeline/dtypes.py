"""Dtype names as users write them, as safetensors headers write them, and as torch has them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import UserError

# Names a user may give in `dtype=` or in per-module overrides.
POLICY_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}

# safetensors header dtype strings (the format's spec).
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    SAFETENSORS_DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    SAFETENSORS_DTYPES["F8_E5M2"] = torch.float8_e5m2
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)


def policy_dtype(name: str, key: str = "dtype") -> torch.dtype:
    try:
        return POLICY_DTYPES[str(name).lower()]
    except KeyError:
        raise UserError(f"{key}: unknown dtype {name!r}; choose one of auto, fp32, fp16, bf16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class DtypePolicy:
    """The `dtype` group as the planner applies it: a policy name (auto keeps the checkpoint's dtype)
    and per-module overrides by pattern."""

    name: str = "auto"
    overrides: dict = field(default_factory=dict)
