"""Exact per-tensor sizes and where each tensor goes, computed from headers alone.

The sizes here are the bytes the loaded model will hold: the target dtype of
every tensor after the dtype policy, quantized weights as bitsandbytes stores
them (pipeline.quant_sizes), tied weights once, buffers included.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .dtypes import SAFETENSORS_DTYPES, dtype_name, itemsize, policy_dtype
from .errors import UserError
from .module_names import map_checkpoint_keys, matches, owner
from .quant_sizes import quantized_nbytes, quantized_storage_dtype
from .sizes import device_order


@dataclass
class TensorPlan:
    name: str
    kind: str                  # "param" or "buffer"
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int                # 0 for tied members that share the canonical tensor
    source: str | None         # checkpoint key, None when the skeleton provides it
    quantized: str | None = None   # "int8", "nf4" or "fp4" for bitsandbytes weights
    tied_to: str | None = None
    device: str = "cpu"

    def to_json(self) -> dict:
        out = {"device": self.device, "dtype": dtype_name(self.dtype), "bytes": self.nbytes, "shape": list(self.shape)}
        if self.source and self.source != self.name:
            out["source"] = self.source
        if self.quantized:
            out["quantized"] = self.quantized
        if self.tied_to:
            out["tied_to"] = self.tied_to
        return out


@dataclass
class Plan:
    strategy: str
    max_memory: dict
    device_map: dict[str, str]
    tensors: dict[str, TensorPlan]
    key_map: dict[str, str]                     # checkpoint key -> model name
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    tied_duplicates: list[str] = field(default_factory=list)  # checkpoint keys of tied copies, not loaded again
    quantized_modules: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    int8_thresholds: dict[str, float] = field(default_factory=dict)  # per-module overrides of the threshold
    warnings: list[str] = field(default_factory=list)
    scales: dict[str, str] = field(default_factory=dict)   # saved int8 checkpoints: weight name -> its .SCB key

    @property
    def predicted_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.device] = out.get(t.device, 0) + t.nbytes
        return dict(sorted(out.items(), key=lambda kv: device_order(kv[0])))

    @property
    def devices(self) -> list[str]:
        return list(self.predicted_bytes)

    def module_bytes(self) -> dict[str, int]:
        """Bytes under each device_map entry (the units the planner placed)."""
        out = {k: 0 for k in self.device_map}
        for t in self.tensors.values():
            probe = t.name
            while probe not in out and probe:
                probe = probe.rpartition(".")[0]
            if probe in out:
                out[probe] += t.nbytes
        return out


def model_tensors(model: torch.nn.Module):
    """(name, kind, tensor, persistent) for every parameter and buffer, tied duplicates included."""
    for name, p in model.named_parameters(remove_duplicate=False):
        yield name, "param", p, True
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for leaf, b in module._buffers.items():
            if b is None:
                continue
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            yield name, "buffer", b, leaf not in module._non_persistent_buffers_set


def plan_tensors(model, checkpoint, *, dtype: str, overrides: dict, keep_in_fp32, tied_groups,
                 quantized_modules, quant: dict | None = None) -> tuple[dict[str, TensorPlan], dict, list, list, list]:
    """Per-tensor dtype and bytes; (tensors, key_map, unexpected, missing, tied_duplicates)."""
    entries = list(model_tensors(model))
    names = {n for n, *_ in entries}
    prefix = getattr(model, "base_model_prefix", None) or None
    key_map, unexpected = map_checkpoint_keys(sorted(checkpoint.tensors), names, prefix)
    source_of: dict[str, str] = {}
    for key, name in key_map.items():
        if name in source_of:
            unexpected.append(key)
        else:
            source_of[name] = key
    policy = None if str(dtype).lower() == "auto" else policy_dtype(dtype, "dtype")
    override_dtypes = {str(p): policy_dtype(d, f"dtype.overrides.{p}") for p, d in (overrides or {}).items()}
    quant = quant or {"method": "none"}
    quantized_weights = {f"{m}.weight" for m in quantized_modules}
    four_bit_biases = {f"{m}.bias" for m in quantized_modules} if quant["method"] in ("nf4", "fp4") else set()
    compute = policy_dtype(quant["compute_dtype"], "quantization.compute_dtype") if four_bit_biases else None
    canonical, tied_duplicates = _tied_canonical(tied_groups, source_of)
    tensors: dict[str, TensorPlan] = {}
    for name, kind, tensor, persistent in entries:
        if name in tensors:
            continue
        key = source_of.get(name)
        info = checkpoint.tensors[key] if key else None
        shape = tuple(info.shape) if info else tuple(tensor.shape)
        if info and shape != tuple(tensor.shape):
            raise UserError(
                f"{info.file}: tensor {key!r} has shape {list(shape)} but the model expects {list(tensor.shape)}; "
                f"the checkpoint does not match config.json"
            )
        if name in canonical and canonical[name] != name:
            tensors[name] = TensorPlan(name, kind, shape, tensor.dtype, 0, None, tied_to=canonical[name])
            continue
        if name in quantized_weights:
            tensors[name] = TensorPlan(name, kind, shape, quantized_storage_dtype(quant), quantized_nbytes(shape, quant),
                                       key, quantized=quant["method"])
            continue
        if name in four_bit_biases:  # Linear4bit casts its bias to the compute dtype at the first forward
            tensors[name] = TensorPlan(name, kind, shape, compute, _numel(shape) * itemsize(compute), key)
            continue
        src_dtype = SAFETENSORS_DTYPES[info.dtype] if info else tensor.dtype
        target = _target_dtype(name, src_dtype, policy, override_dtypes, keep_in_fp32, from_checkpoint=info is not None)
        tensors[name] = TensorPlan(name, kind, shape, target, _numel(shape) * itemsize(target), key)
    # Tied members were planned before their canonical in some orders: fix their dtype now.
    for t in tensors.values():
        if t.tied_to:
            t.dtype = tensors[t.tied_to].dtype
    missing: list[str] = []
    for n, _kind, tensor, _persistent in entries:
        if tensor.device.type == "meta" and canonical.get(n, n) not in source_of and n not in missing:
            missing.append(n)
    return tensors, key_map, sorted(unexpected), missing, tied_duplicates


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


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


def _target_dtype(name, src: torch.dtype, policy, overrides, keep_in_fp32, from_checkpoint: bool) -> torch.dtype:
    if not src.is_floating_point:
        return src
    for pattern, dt in overrides.items():
        if matches(name, pattern):
            return dt
    if not from_checkpoint:
        return src  # skeleton buffers (rotary frequencies...) keep the dtype the model made them in
    if policy is not None and policy != torch.float32 and any(matches(name, p) for p in keep_in_fp32 or ()):
        return torch.float32
    return policy or src


def assign_devices(tensors: dict[str, TensorPlan], device_map: dict[str, str]) -> None:
    """Put every tensor on the device of its deepest device_map prefix; tied members follow their canonical."""
    uncovered = []
    for t in tensors.values():
        dev = owner(t.name, device_map)
        if dev is None:
            uncovered.append(t.name)
        else:
            t.device = dev
    if uncovered:
        raise UserError(
            f"device_map.map: no entry covers {uncovered[0]!r}" + (f" (and {len(uncovered) - 1} more)" if len(uncovered) > 1 else "")
            + "; add a prefix for it or an entry for '' as the default"
        )
    for t in tensors.values():
        if t.tied_to and tensors[t.tied_to].device != t.device:
            raise UserError(
                f"device_map.map: tied weights {t.tied_to!r} and {t.name!r} are mapped to different devices "
                f"({tensors[t.tied_to].device} and {t.device}); map them to one device"
            )
