"""Exact per-tensor dtypes and bytes, computed from checkpoint headers alone.

The sizes here are the bytes the loaded model will hold: the target dtype of every
tensor after the dtype policy, quantized weights as bitsandbytes stores them
(quant/sizes.py), tied weights once, buffers included. Devices are assigned later
(planning/device_map.py), so every TensorPlan here starts on "cpu".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from ..checkpoint.pieces import Piece
from ..dtypes import SAFETENSORS_DTYPES, DtypePolicy, dtype_name, itemsize, policy_dtype
from ..errors import UserError
from ..hf.conversions import Conversion, map_keys
from ..names import matches
from ..quant.formats.bnb_keys import check_saved_shape
from ..quant.sizes import quantized_nbytes, quantized_storage_dtype
from ..quant.spec import QuantSpec
from .slices import TensorSlice

CONV1D_TRANSPOSE = "Transpose(0, 1) (Conv1D weight, as transformers' bitsandbytes integration)"


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
    conversion: Conversion | None = None  # assembled from checkpoint tensors (source is the first of them)
    load_dtype: torch.dtype | None = None  # int8 weights: the dtype the policy loads them in before quantizing
    slice: TensorSlice | None = None  # tensor parallel: this rank's shard (shape above is the shard's)

    def to_json(self) -> dict:
        out = {"device": self.device, "dtype": dtype_name(self.dtype), "bytes": self.nbytes, "shape": list(self.shape)}
        if self.source and self.source != self.name:
            out["source"] = self.source
        if self.quantized:
            out["quantized"] = self.quantized
        if self.tied_to:
            out["tied_to"] = self.tied_to
        if self.conversion:
            out["conversion"] = self.conversion.to_json()
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
    model,
    checkpoint,
    *,
    policy: DtypePolicy,
    keep_in_fp32,
    tied_groups,
    quantized_modules,
    spec: QuantSpec,
    transposed=(),
    saved: dict[str, tuple[int, tuple[int, ...]]] | None = None,
) -> PlannedTensors:
    """Every model tensor's dtype, bytes and checkpoint source, with the quantized modules as given.

    `transposed`: quantized modules whose checkpoint weight is stored (in, out) (GPT-2's Conv1D);
    bitsandbytes holds them (out, in), so they are planned and loaded transposed, as transformers does.
    `saved`: pre-quantized weights -> (bytes of the stats saved beside them, the shape bitsandbytes
    holds); see quant/sizes.py saved_size.
    """
    entries = list(model_tensors(model))
    names = {n: t for n, _kind, t in entries}
    mapping = map_keys(model, checkpoint.tensors, names)
    unexpected = list(mapping.unexpected)
    source_of: dict[str, str] = {}
    for key, name in mapping.renamed.items():
        if name in source_of or name in mapping.converted:
            unexpected.append(key)
        else:
            source_of[name] = key
    for name, conv in mapping.converted.items():
        source_of[name] = conv.sources[0]
    canonical, tied_duplicates = _tied_canonical(tied_groups, source_of)
    rules = _DtypeRules(policy, keep_in_fp32, quantized_modules, spec, saved or {})
    flipped = {f"{m}.weight" for m in transposed if m in set(quantized_modules)}
    tensors: dict[str, TensorPlan] = {}
    for name, kind, tensor in entries:
        if name not in tensors:
            key = source_of.get(name)
            info = checkpoint.tensors[key] if key else None
            conv = mapping.converted.get(name)
            if name in flipped and key and canonical.get(name, name) == name:
                conv = _transposed(conv, info)
            tensors[name] = rules.plan(name, kind, tensor, key, info, canonical.get(name, name), conv)
    for name, t in tensors.items():  # tied members planned before their canonical take its dtype
        if t.tied_to:
            tensors[name] = replace(t, dtype=tensors[t.tied_to].dtype)
    missing: list[str] = []
    for n, _kind, tensor in entries:
        if tensor.device.type == "meta" and canonical.get(n, n) not in source_of and n not in missing:
            missing.append(n)
    key_map = dict(mapping.renamed)
    key_map.update({k: name for name, conv in mapping.converted.items() for k in conv.sources})
    _refuse_mismatch(sorted(unexpected), missing)
    return PlannedTensors(tensors, key_map, sorted(unexpected), missing, tied_duplicates)


def _transposed(conv: Conversion | None, info) -> Conversion:
    """A Conv1D weight (in, out) loaded as the (out, in) weight of a bitsandbytes Linear."""
    if conv is not None:
        raise UserError(f"checkpoint: {info.name!r} is both converted by transformers and a Conv1D weight")
    shape = tuple(info.shape)
    return Conversion(
        (shape[1], shape[0]),
        SAFETENSORS_DTYPES[info.dtype],
        (Piece(info.name, into=(("transpose", 0, 1),)),),
        CONV1D_TRANSPOSE,
    )


def _refuse_mismatch(unexpected: list[str], missing: list[str]) -> None:
    """Checkpoint keys that no model tensor or conversion takes while model tensors go without: exit 2, now.

    (An extra tensor beside a complete checkpoint, or a tensor missing with nothing
    left over, stays a validate check: the load itself is sound.)
    """
    if not (unexpected and missing):
        return
    more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
    raise UserError(
        f"checkpoint: keys {', '.join(unexpected[:3])}{more} match no model tensor and no conversion "
        f"transformers applies, while {len(missing)} model tensors (first {missing[0]}) have no source; "
        f"the checkpoint was saved for another architecture or config.json names the wrong class"
    )


class _DtypeRules:
    """The dtype and bytes of one tensor: tied copy, quantized weight, 4-bit bias, or the dtype policy."""

    def __init__(self, policy: DtypePolicy, keep_in_fp32, quantized_modules, spec: QuantSpec, saved):
        self.policy = None if policy.name.lower() == "auto" else policy_dtype(policy.name, "dtype")
        self.overrides = {str(p): policy_dtype(d, f"dtype.overrides.{p}") for p, d in policy.overrides.items()}
        self.keep_in_fp32 = list(keep_in_fp32 or ())
        self.spec = spec
        self.quantized_weights = {f"{m}.weight" for m in quantized_modules}
        self.four_bit_biases = {f"{m}.bias" for m in quantized_modules if spec.for_module(m).is_four_bit}
        self.compute = policy_dtype(spec.compute_dtype, "quantization.compute_dtype") if self.four_bit_biases else None
        self.saved = saved

    def plan(self, name, kind, tensor, key, info, canonical, conv: Conversion | None = None) -> TensorPlan:
        if info and name in self.saved and name in self.quantized_weights:  # pre-quantized: as saved
            stats_bytes, shape = self.saved[name]
            method = self.spec.method_of(name.rpartition(".")[0])  # a saved mixed plan: the module's own
            check_saved_shape(info, shape, method)
            dtype = SAFETENSORS_DTYPES[info.dtype]
            return TensorPlan(name, kind, shape, dtype, info.nbytes + stats_bytes, key, method)
        _check_shape(name, tensor, key, info, conv)
        _check_dtype(name, tensor, key, info, conv)
        shape = conv.shape if conv else tuple(info.shape) if info else tuple(tensor.shape)
        if canonical != name:
            return TensorPlan(name, kind, shape, tensor.dtype, 0, None, tied_to=canonical)
        if name in self.quantized_weights:
            spec = self.spec.for_module(name.rpartition(".")[0])  # a mixed plan: this module's own method
            nbytes = quantized_nbytes(shape, spec)
            storage = quantized_storage_dtype(spec)
            src = conv.dtype if conv else SAFETENSORS_DTYPES[info.dtype] if info else tensor.dtype
            load = self.target_dtype(name, src, from_checkpoint=True) if spec.is_int8 else None
            return TensorPlan(name, kind, shape, storage, nbytes, key, spec.method, conversion=conv, load_dtype=load)
        if name in self.four_bit_biases:  # Linear4bit casts its bias to the compute dtype at the first forward
            return TensorPlan(name, kind, shape, self.compute, math.prod(shape) * itemsize(self.compute), key)
        src = conv.dtype if conv else SAFETENSORS_DTYPES[info.dtype] if info else tensor.dtype
        target = self.target_dtype(name, src, from_checkpoint=info is not None)
        return TensorPlan(name, kind, shape, target, math.prod(shape) * itemsize(target), key, conversion=conv)

    def target_dtype(self, name, src: torch.dtype, from_checkpoint: bool) -> torch.dtype:
        if not src.is_floating_point:
            return src
        for pattern, dt in self.overrides.items():
            if matches(name, pattern):
                return dt
        if not from_checkpoint:
            return src  # skeleton buffers (rotary frequencies...) keep the dtype the model made them in
        if self.policy not in (None, torch.float32) and any(_kept(name, p) for p in self.keep_in_fp32):
            return torch.float32
        return self.policy or src


def _kept(name: str, pattern: str) -> bool:
    """A keep-in-fp32 entry matches as ours do, or as transformers' dtype plan does (a regex search)."""
    return matches(name, pattern) or re.search(pattern, name) is not None


def _check_shape(name, tensor, key, info, conv: Conversion | None) -> None:
    """The checkpoint's shape (or the converted one) is the skeleton's (Conv1D weights before their transpose)."""
    want = list(tensor.shape)
    if conv is not None and conv.ops != CONV1D_TRANSPOSE:
        if list(conv.shape) != want:
            raise UserError(
                f"checkpoint: {name!r} built from {conv.sources[0]!r} ({len(conv.sources)} tensors, {conv.ops}) "
                f"has shape {list(conv.shape)} but the model expects {want}; the checkpoint does not match config.json"
            )
    elif info is not None and list(info.shape) != want:
        raise UserError(
            f"{info.file}: tensor {key!r} has shape {list(info.shape)} but the model expects {want}; "
            f"the checkpoint does not match config.json"
        )


def _check_dtype(name, tensor, key, info, conv: Conversion | None) -> None:
    """A checkpoint tensor of integer or bool dtype where the model holds floats (an `I32` norm weight) is a
    corrupt header, not a cast to make: refused here, from the header, before a byte is read."""
    src = conv.dtype if conv is not None else SAFETENSORS_DTYPES[info.dtype] if info is not None else None
    if src is None or src.is_floating_point or not tensor.dtype.is_floating_point:
        return
    where = f"{info.file}: tensor {key!r}" if info is not None else f"checkpoint: {name!r} built from {key!r}"
    raise UserError(
        f"{where} is {dtype_name(src)} but the model's {name} is floating point ({dtype_name(tensor.dtype)}); "
        f"the checkpoint is corrupt or for another model: re-save it"
    )


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
