"""Checkpoint keys to model tensors as transformers' from_pretrained maps them, from headers alone.

transformers 5 renames and fuses weights when it loads. We do not copy its table: its own
`get_model_conversion_mapping` and `rename_source_key` decide what maps to what, and a converter's ops run
twice on shapes alone, by transformers on meta tensors and by pieces.py (where each source lands), which must
agree (docs/design.md, "Key conversions"). Older transformers without the mapping: the model class's
`_checkpoint_conversion_mapping` regexes and the gamma/beta LayerNorm names.
"""

from __future__ import annotations

import re
from copy import deepcopy
from dataclasses import dataclass, field
from functools import partial

import torch

from ..checkpoint import pieces as P
from ..dtypes import SAFETENSORS_DTYPES
from ..errors import UserError


@dataclass(frozen=True)
class Conversion:
    """How one model tensor is assembled from several checkpoint tensors (or one, reshaped)."""

    shape: tuple[int, ...]
    dtype: torch.dtype  # the checkpoint dtype of its sources (promoted, as torch.cat would)
    pieces: tuple[P.Piece, ...]
    ops: str  # e.g. "MergeModulelist(dim=0), Concatenate(dim=1)"

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.source for p in self.pieces))

    def to_json(self) -> dict:
        return {"ops": self.ops, "sources": list(self.sources)}


@dataclass
class KeyMapping:
    renamed: dict[str, str] = field(default_factory=dict)  # checkpoint key -> model name (one to one)
    converted: dict[str, Conversion] = field(default_factory=dict)  # model name -> its assembly
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys no model tensor takes


def map_keys(model, tensors: dict, names: dict[str, torch.Tensor]) -> KeyMapping:
    """Every checkpoint key (of `tensors`, name -> TensorInfo) to the model tensor(s) it feeds."""
    prefix = getattr(model, "base_model_prefix", None) or None
    transforms = _transforms(model)
    if transforms is None:
        return _legacy_map(model, tensors, names, prefix)
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    out = KeyMapping()
    groups: dict[str, tuple] = {}  # first target -> (converter, {pattern: [keys]})
    for key in sorted(tensors, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, prefix, names)
        if target not in names and key in names:
            target, pattern = rename_source_key(key, [], [], prefix, names)
        if target not in names:
            out.unexpected.append(key)
        elif pattern is None:
            out.renamed[key] = target
        else:
            conv, collected = groups.setdefault(target, (by_pattern[pattern], {}))
            collected.setdefault(pattern, []).append(key)
    lacking: list[str] = []
    for first, (conv, collected) in groups.items():
        for name, conversion in _convert(model, conv, first, collected, tensors).items():
            if name in names:
                out.converted[name] = conversion
            else:  # transformers counts such sources as unexpected too
                lacking += conversion.sources
    used = {k for c in out.converted.values() for k in c.sources}
    out.unexpected += sorted({k for k in lacking if k not in used})
    return out


def _transforms(model):
    """transformers' transforms for this model class; None without that machinery or for a plain torch module."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    return get_model_conversion_mapping(model)


def _convert(model, converter, first: str, collected: dict[str, list[str]], tensors) -> dict[str, Conversion]:
    """The converter's targets: names and shapes from transformers on meta, pieces from pieces.py."""
    ops = ", ".join(repr(op) for op in converter.operations)
    try:
        placed = _interpret(model, converter, first, collected, tensors)
    except ValueError as exc:
        raise UserError(
            f"checkpoint: cannot build {first!r} from {collected[next(iter(collected))][0]!r}: {exc}"
        ) from None
    meta = deepcopy(converter)
    for pattern, keys in collected.items():
        for key in keys:
            info = tensors[key]
            make = partial(torch.empty, tuple(info.shape), dtype=SAFETENSORS_DTYPES[info.dtype], device="meta")
            meta.add_tensor(first, key, pattern, make)
    made = meta.convert(first, model=model, config=model.config)
    expected = {k: tuple((v[0] if isinstance(v, list) else v).shape) for k, v in made.items()}
    ours = {k: v.shape for k, v in placed.items()}
    if ours != expected:
        raise AssertionError(f"conversion of {first!r}: transformers gives {expected}, pieces.py {ours}")
    dtypes = [SAFETENSORS_DTYPES[tensors[k].dtype] for keys in collected.values() for k in keys]
    dtype = dtypes[0]
    for d in dtypes[1:]:
        dtype = torch.promote_types(dtype, d)
    return {k: Conversion(v.shape, dtype, v.pieces, ops) for k, v in placed.items()}


def _interpret(model, converter, first: str, collected, tensors) -> dict[str, P.Virtual]:
    state: dict = {
        pattern: [P.Virtual(tuple(tensors[k].shape), (P.Piece(k),)) for k in keys]
        for pattern, keys in collected.items()
    }
    handlers = _handlers()
    for op in converter.operations:
        handler = handlers.get(type(op))
        if handler is None:
            raise P.unsupported(op, first, [c.__name__ for c in handlers])
        state = handler(op, state, converter, first, model)
    state = {k: (v[0] if isinstance(v, list) else v) for k, v in state.items()}
    full = first.replace("*.", "0.") if "*." in first else first
    hit = next((k for k in state if k in full), None)  # as WeightConverter.convert names its outputs
    if hit is None:
        return state
    prefix, _, suffix = full.partition(hit)
    return {prefix + k + suffix: v for k, v in state.items()}


def _handlers() -> dict:
    """Our shape-only reading of each op class the installed transformers defines (older ones lack some)."""
    from transformers import core_model_loading as ops

    wanted = {"MergeModulelist": _merge, "Concatenate": _concatenate, "Chunk": _chunk, "Split": _split}
    wanted["Transpose"] = _transpose
    return {getattr(ops, name): handler for name, handler in wanted.items() if hasattr(ops, name)}


def _single(state: dict) -> P.Virtual:
    if len(state) != 1:
        raise ValueError("a one-source op got several sources")
    value = next(iter(state.values()))
    return value[0] if isinstance(value, list) else value


def _merge(op, state, converter, first, model):
    out = {}
    size = len(state)
    for pattern, value in state.items():
        target = op.get_target_pattern(size, pattern, converter.target_patterns)
        out[target] = value if isinstance(value, P.Virtual) else P.stack(value, op.dim)
    return out


def _concatenate(op, state, converter, first, model):
    target = op.get_target_pattern(converter.target_patterns)
    parts = []
    for pattern in converter.source_patterns:  # the order of the source patterns, as transformers keeps it
        if pattern in state:
            value = state[pattern]
            parts += value if isinstance(value, list) else [value]
    return {target: P.concatenate(parts, op.dim)}


def _chunk(op, state, converter, first, model):
    part = _single(state)
    targets = op.get_target_patterns(converter.target_patterns, config=model.config)
    bounds = P.chunk_bounds(part.shape[op.dim], len(targets))
    return {t: P.narrow(part, op.dim, s, n) for t, (s, n) in zip(targets, bounds, strict=False)}


def _split(op, state, converter, first, model):
    part = _single(state)
    targets = converter.target_patterns
    sizes = [model.get_parameter(first.replace(targets[0], t)).shape[op.dim] for t in targets]
    return {t: P.narrow(part, op.dim, s, n) for t, (s, n) in zip(targets, P.split_bounds(sizes), strict=True)}


def _transpose(op, state, converter, first, model):
    target = op.get_target_pattern(state, converter.source_patterns, converter.target_patterns)
    part = _single(state)
    if op.check_dims and tuple(model.get_parameter(first).shape) == part.shape:
        return {target: part}
    return {target: P.transpose(part, op.dim0, op.dim1)}


def _legacy_map(model, tensors, names, prefix) -> KeyMapping:
    """transformers 4: the class's `_checkpoint_conversion_mapping` regexes, gamma/beta, the base prefix."""
    rules = dict(getattr(model, "_checkpoint_conversion_mapping", None) or {})
    out = KeyMapping()
    for key in sorted(tensors):
        renamed = key
        for pattern, replacement in rules.items():
            renamed, n = re.subn(pattern, replacement, renamed)
            if n:
                break
        target = _candidate(renamed, names, prefix) or _candidate(key, names, prefix)
        if target is None:
            out.unexpected.append(key)
        else:
            out.renamed[key] = target
    return out


def _candidate(key: str, names, prefix: str | None):
    for k in (key, _gamma_beta(key)):
        if k in names:
            return k
        if prefix:
            if f"{prefix}.{k}" in names:
                return f"{prefix}.{k}"
            if k.startswith(prefix + ".") and k[len(prefix) + 1 :] in names:
                return k[len(prefix) + 1 :]
    return None


def _gamma_beta(key: str) -> str:
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key
