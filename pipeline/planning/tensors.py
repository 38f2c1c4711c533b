"""Exact per-tensor dtypes and bytes, computed from checkpoint headers alone.

The sizes here are the bytes the loaded model will hold: the target dtype of every
tensor after the dtype policy, quantized weights as bitsandbytes stores them
(quant/sizes.py), tied weights once, buffers included. Devices are assigned later
(planning/device_map.py), so every TensorPlan here starts on "cpu".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from ..dtypes import SAFETENSORS_DTYPES, DtypePolicy, dtype_name, itemsize, policy_dtype
from ..errors import UserError
from ..names import map_checkpoint_keys, matches
from ..quant.sizes import quantized_nbytes, quantized_storage_dtype
from ..quant.spec import QuantSpec
from .slices import TensorSlice


@dataclass(frozen=True)
class TensorPlan:
    name: str
    kind: str  # "param" or "buffer"
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int  # 0 for tied members that share the canonical tensor
    source: str | None  # checkpoint key, None when the skeleton provides it
    quantized: str | None = None  # "int8", "nf4" or "fp4" for bitsandbytes weights
    tied_to: str | None = None
    device: str = "cpu"
    slice: TensorSlice | None = None  # tensor parallel: this rank's shard (shape above is the shard's)

    def to_json(self) -> dict:
        out = {"device": self.device, "dtype": dtype_name(self.dtype), "bytes": self.nbytes, "shape": list(self.shape)}
        if self.source and self.source != self.name:
            out["source"] = self.source
        if self.quantized:
            out["quantized"] = self.quantized
        if self.tied_to:
            out["tied_to"] = self.tied_to
        if self.slice is not None:
            out["slice"] = self.slice.to_json()
        return out


class PlannedTensors(NamedTuple):
    tensors: dict[str, TensorPlan]  # model name -> its plan, in model order
    key_map: dict[str, str]  # checkpoint key -> model name
    unexpected: list[str]  # checkpoint keys no model tensor takes
    missing: list[str]  # model tensors the checkpoint does not provide
    tied_duplicates: list[str]  # checkpoint keys of tied copies, not loaded again


def model_tensors(model: torch.nn.Module):
    """(name, kind, tensor) for every parameter and buffer, tied duplicates included."""
    for name, p in model.named_parameters(remove_duplicate=False):
        yield name, "param", p
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for leaf, b in module._buffers.items():
            if b is not None:
                yield (f"{mod_name}.{leaf}" if mod_name else leaf), "buffer", b


def plan_tensors(
    model, checkpoint, *, policy: DtypePolicy, keep_in_fp32, tied_groups, quantized_modules, spec: QuantSpec
) -> PlannedTensors:
    """Every model tensor's dtype, bytes and checkpoint source, with the quantized modules as given."""
    entries = list(model_tensors(model))
    prefix = getattr(model, "base_model_prefix", None) or None
    key_map, unexpected = map_checkpoint_keys(sorted(checkpoint.tensors), {n for n, *_ in entries}, prefix)
    source_of: dict[str, str] = {}
    for key, name in key_map.items():
        if name in source_of:
            unexpected.append(key)
        else:
            source_of[name] = key
    canonical, tied_duplicates = _tied_canonical(tied_groups, source_of)
    rules = _DtypeRules(policy, keep_in_fp32, quantized_modules, spec)
    tensors: dict[str, TensorPlan] = {}
    for name, kind, tensor in entries:
        if name not in tensors:
            key = source_of.get(name)
            info = checkpoint.tensors[key] if key else None
            tensors[name] = rules.plan(name, kind, tensor, key, info, canonical.get(name, name))
    for name, t in tensors.items():  # tied members planned before their canonical take its dtype
        if t.tied_to:
            tensors[name] = replace(t, dtype=tensors[t.tied_to].dtype)
    missing: list[str] = []
    for n, _kind, tensor in entries:
        if tensor.device.type == "meta" and canonical.get(n, n) not in source_of and n not in missing:
            missing.append(n)
    return PlannedTensors(tensors, key_map, sorted(unexpected), missing, tied_duplicates)


class _DtypeRules:
    """The dtype and bytes of one tensor: tied copy, quantized weight, 4-bit bias, or the dtype policy."""

    def __init__(self, policy: DtypePolicy, keep_in_fp32, quantized_modules, spec: QuantSpec):
        self.policy = None if policy.name.lower() == "auto" else policy_dtype(policy.name, "dtype")
        self.overrides = {str(p): policy_dtype(d, f"dtype.overrides.{p}") for p, d in policy.overrides.items()}
        self.keep_in_fp32 = list(keep_in_fp32 or ())
        self.spec = spec
        self.quantized_weights = {f"{m}.weight" for m in quantized_modules}
        self.four_bit_biases = {f"{m}.bias" for m in quantized_modules} if spec.is_four_bit else set()
        self.compute = policy_dtype(spec.compute_dtype, "quantization.compute_dtype") if spec.is_four_bit else None

    def plan(self, name, kind, tensor, key, info, canonical) -> TensorPlan:
        shape = tuple(info.shape) if info else tuple(tensor.shape)
        if info and shape != tuple(tensor.shape):
            raise UserError(
                f"{info.file}: tensor {key!r} has shape {list(shape)} but the model expects {list(tensor.shape)}; "
                f"the checkpoint does not match config.json"
            )
        if canonical != name:
            return TensorPlan(name, kind, shape, tensor.dtype, 0, None, tied_to=canonical)
        if name in self.quantized_weights:
            nbytes = quantized_nbytes(shape, self.spec)
            return TensorPlan(name, kind, shape, quantized_storage_dtype(self.spec), nbytes, key, self.spec.method)
        if name in self.four_bit_biases:  # Linear4bit casts its bias to the compute dtype at the first forward
            return TensorPlan(name, kind, shape, self.compute, math.prod(shape) * itemsize(self.compute), key)
        src = SAFETENSORS_DTYPES[info.dtype] if info else tensor.dtype
        target = self.target_dtype(name, src, from_checkpoint=info is not None)
        return TensorPlan(name, kind, shape, target, math.prod(shape) * itemsize(target), key)

    def target_dtype(self, name, src: torch.dtype, from_checkpoint: bool) -> torch.dtype:
        if not src.is_floating_point:
            return src
        for pattern, dt in self.overrides.items():
            if matches(name, pattern):
                return dt
        if not from_checkpoint:
            return src  # skeleton buffers (rotary frequencies...) keep the dtype the model made them in
        if self.policy not in (None, torch.float32) and any(matches(name, p) for p in self.keep_in_fp32):
            return torch.float32
        return self.policy or src


def _tied_canonical(tied_groups, source_of) -> tuple[dict[str, str], list[str]]:
    """Each tied name -> the member that is loaded (the first with a checkpoint source)."""
    canonical: dict[str, str] = {}
    duplicates: list[str] = []
    for group in tied_groups:
        group = sorted(group)
        sourced = [n for n in group if n in source_of]
        head = sourced[0] if sourced else group[0]
        for n in group:
            canonical[n] = head
        duplicates += [source_of[n] for n in sourced[1:]]
    return canonical, duplicates
