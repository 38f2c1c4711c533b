"""The config's one contract: every key of every concern group, with its one type and one default.

Registered in Hydra's ConfigStore as `<group>/_schema`; each YAML preset lists `_schema` first in
its defaults list and sets only what differs, so OmegaConf checks every value's type when Hydra
composes (a command-line override included). Values the schema cannot type (memory caps, device
maps, per-module overrides: mappings of the user's own keys) are `Any` here and parsed once by
their owners (sizes.py, quant/spec.py). Code that needs a default reads it from here (QuantizationSchema().threshold).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from typing import Any, Optional  # noqa: UP035  (OmegaConf reads these annotations at runtime)

from omegaconf import OmegaConf

from .errors import UserError


@dataclass
class CheckpointSchema:
    name: str = "checkpoint"  # the run's name (runs/<name>/...) unless checkpoint.path names one
    builtin: Optional[str] = None  # noqa: UP045  a built-in checkpoint (smollm2), prepared under $MODEL_LOADER_CACHE
    path: Optional[str] = None  # noqa: UP045  HF directory, .safetensors or .gguf file, or a cached Hub repo id
    revision: Optional[str] = None  # noqa: UP045  a Hub repo id's branch, tag or commit (null: main)
    model: Any = None  # a `_target_` node; null: the class config.json names
    allow_pickle: bool = False
    allow_missing: bool = False
    trust_remote_code: bool = False


@dataclass
class DtypeSchema:
    name: str = "auto"  # auto (the checkpoint's own), fp32, bf16, fp16
    overrides: Any = None  # module/tensor pattern -> dtype


@dataclass
class DeviceMapSchema:
    strategy: str = "auto"  # auto, balanced, balanced_low_0, sequential, cpu, explicit
    map: Any = None  # explicit: module prefix -> device


@dataclass
class MemorySchema:
    max_memory: Any = None  # device -> size ("20GiB", "500MB", bytes, auto); null: free memory per device


@dataclass
class QuantizationSchema:
    method: str = "none"  # none, int8, nf4, fp4
    threshold: float = 6.0  # LLM.int8 outlier threshold; 0 disables the fp16 outlier path
    cpu_matmul: str = "exact"  # exact or bitsandbytes (docs/quantization.md)
    cpu_numerics: str = "portable"  # portable or native (docs/quantization.md)
    # Never quantized: the output head, tied weights, modules the model keeps in fp32, and these patterns.
    skip_modules: Any = field(default_factory=list)  # a list of patterns; checked by quant/spec.py (one line)
    overrides: Any = None  # pattern -> threshold (int8) or skip; first match wins
    # Per-module methods, pattern -> int8, nf4, fp4 or keep (first match wins; docs/quantization.md).
    methods: Any = None
    # quantization=auto: the largest perplexity increase allowed on the evaluation text (1% or 0.01).
    budget: Optional[str] = None  # noqa: UP045
    # Layers the plan puts on the CPU while a GPU runs the model: the method's name quantizes them in CPU
    # memory and runs them there; keep leaves them in their load dtype, streamed to the GPU. Disk: always kept.
    offloaded: str = "keep"
    # What stays unquantized (embeddings, norms, head); null follows `dtype`, fp32 is an opt-in.
    unquantized_dtype: Optional[str] = None  # noqa: UP045
    compute_dtype: str = "bf16"  # 4-bit: the dtype weights dequantize to and multiply in
    double_quant: bool = True  # 4-bit: quantize the absmax values too (8-bit, fp32 per 256 blocks)
    blocksize: int = 64  # 4-bit: values per absmax block


@dataclass
class ParallelSchema:
    mode: str = "none"  # none or tensor
    world_size: Optional[int] = None  # noqa: UP045  null: torchrun's WORLD_SIZE
    backend: str = "auto"  # auto, gloo, nccl
    device: str = "auto"  # auto, cpu, cuda
    timeout_s: float = 60.0
    save_logits: bool = False


GROUPS: dict[str, type] = {
    "checkpoint": CheckpointSchema,
    "dtype": DtypeSchema,
    "device_map": DeviceMapSchema,
    "memory": MemorySchema,
    "quantization": QuantizationSchema,
    "parallel": ParallelSchema,
}
# Keys of the root config besides the groups (config.yaml documents them).
# Keys that grant a permission (run pickle code, accept a partial checkpoint, run the checkpoint's code):
# from the command line only a word that plainly says yes or no grants or withholds one, never `2` or `maybe`.
PERMISSIONS = ("checkpoint.allow_pickle", "checkpoint.allow_missing", "checkpoint.trust_remote_code")
PLAIN_BOOLEANS = {"true", "false", "yes", "no", "on", "off", "1", "0"}
ROOT_KEYS = ("name", "allow_targets", "sweep_reuse", "sweep_objective", "stages", "hydra", "defaults")


def register() -> None:
    """Store every group's schema as `<group>/_schema` (idempotent; Hydra reads the store at compose time)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, schema in GROUPS.items():
        store.store(group=group, name="_schema", node=schema)


def closest(key: str, candidates, prefix: str = "") -> str:
    """`did you mean <prefix>X?` for the nearest candidate, or the list of valid keys."""
    candidates = sorted(map(str, candidates))
    near = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f"did you mean {prefix}{near[0]}?" if near else f"valid keys: {', '.join(prefix + c for c in candidates)}"


def check_keys(cfg, overrides=()) -> None:
    """Every key of a concern group is one the schema has (a `+key=` or a config file adding one is a typo, never
    silently ignored), with a value of its type; a root key added from the command line must be a known one."""
    for group, schema in GROUPS.items():
        node = cfg.get(group) if cfg is not None else None
        if node is None:
            continue
        known = {f.name for f in fields(schema)}
        for key in node:
            if key not in known:
                raise UserError(f"{group}.{key}: unknown key; {closest(str(key), known, group + '.')}")
        _check_types(group, schema, node)
    known_root = set(ROOT_KEYS) | set(GROUPS) | set(_choices(cfg))
    for override in map(str, overrides):
        key = override.lstrip("+").split("=", 1)[0].strip()
        _check_permission(key, override.split("=", 1)[1] if "=" in override else "")
        if override.startswith("+") and not any(c in key for c in "./@") and key not in known_root:
            raise UserError(f"{key}: unknown key; {closest(key, set(ROOT_KEYS[:4]) | set(GROUPS))}")


def _check_permission(key: str, raw: str) -> None:
    if key in PERMISSIONS and raw.strip().strip("'\"").lower() not in PLAIN_BOOLEANS:
        raise UserError(f"{key}: {raw.strip()!r} is not true or false; set {key}=true or {key}=false")


def _choices(cfg) -> list[str]:
    """The groups Hydra selected (`+experiment=dry_run` adds a group, not a key)."""
    try:
        return list(cfg.hydra.runtime.choices or {})
    except Exception:  # noqa: BLE001 - composed without the hydra node
        return []


def _check_types(group: str, schema: type, node) -> None:
    """A group from a file without `_schema` in its defaults (a user's own) gets the schema's types too."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(node, resolve=False))
    except OmegaConfBaseException as exc:
        raise UserError(type_error(exc, group)) from None


def type_error(exc: Exception, prefix: str = "") -> str:
    """OmegaConf's multi-line validation error as our one line: the key, the value, the type wanted, the fix."""
    key = getattr(exc, "full_key", "") or ""
    key = f"{prefix}.{key}" if prefix and key and not key.startswith(prefix + ".") else key or prefix or "config"
    first = (str(exc).splitlines() or [""])[0].strip()
    wanted = {"Float": "a number", "Integer": "an integer", "Bool": "true or false", "String": "a string"}
    for name, words in wanted.items():
        if f"converted to {name}" in first or f"not a valid {name.lower()}" in first:
            value = getattr(exc, "value", None)
            shown = repr(value) if value is not None else first.split("'")[1] if "'" in first else "the value"
            return f"{key}: {shown} is not {words}; set {key} to {words}"
    return f"{key}: {first}"
