"""Bind YAML stage nodes to stage functions, importing only allow-listed `_target_`s.

Configs come from colleagues and the internet; a `_target_: os.system` must be
refused before anything is imported. Allowed: this package's stages, torch.nn
modules, transformers model classes, and what the user lists in allow_targets.
Every `_target_` in a stage's keys (e.g. checkpoint.model) is checked here, when
the stages are bound, before any stage runs.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from ..errors import UserError

BUILTIN_PREFIXES = ("pipeline.stages.", "torch.nn.", "transformers.")
# Dotted names that moved when the package was laid out by concern: old name -> new name.
MOVED = {
    "pipeline.sweep_summary.SweepSummary": "pipeline.sweeps.summary.SweepSummary",
}


def is_allowed(target: str, extra: Iterable[str] = ()) -> bool:
    for entry in list(extra or ()):
        entry = str(entry)
        if target == entry or (entry.endswith(".*") and target.startswith(entry[:-1])):
            return True
    if not target.startswith(BUILTIN_PREFIXES):
        return False
    return ".." not in target and not target.endswith(".")


def locate(target, key: str, extra: Iterable[str] = ()):
    """Import an allow-listed dotted name; refuse anything else before importing it."""
    if not isinstance(target, str) or not target:
        raise UserError(f"{key}._target_: missing or not a dotted name")
    if target in MOVED:
        raise UserError(f"{key}._target_: {target} has moved; use {MOVED[target]}")
    if not is_allowed(target, extra):
        raise UserError(
            f"{key}._target_: {target} is not allow-listed; only pipeline.stages.*, torch.nn.*, transformers.* "
            f"or names listed in allow_targets may be instantiated"
        )
    try:
        obj = get_object(target)
    except Exception as exc:  # ImportError, AttributeError, hydra's InstantiationException
        raise UserError(
            f"{key}._target_: cannot import {target} ({exc.__class__.__name__}); check the spelling"
        ) from None
    if (
        target.startswith("transformers.")
        and not _is_transformers_model(obj)
        and target not in set(map(str, extra or ()))
    ):
        raise UserError(
            f"{key}._target_: {target} is not a transformers model class; name a model class such as transformers.LlamaForCausalLM"
        )
    return obj


def _is_transformers_model(obj) -> bool:
    owner = getattr(obj, "__self__", None) or obj  # bound classmethods like from_config
    return inspect.isclass(owner) and (hasattr(owner, "from_config") or hasattr(owner, "_from_config"))


def bind_stage(name: str, node: DictConfig, extra: Iterable[str] = ()) -> Callable:
    """A stage callable `fn(ctx)` whose YAML keys were checked against the function's signature."""
    key = f"stages.{name}"
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise UserError(f"{key}: a stage node needs _target_ and _partial_: true; see conf/stages/")
    fn = locate(node._target_, key, extra)
    params = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not k.startswith("_")}
    for param, value in params.items():
        check_nested_targets(value, _source_key(node, param, key), extra)
    sig = inspect.signature(fn)
    try:
        sig.bind(None, **params)
    except TypeError:
        accepted = [p for p in list(sig.parameters)[1:]]
        unknown = [k for k in params if k not in sig.parameters]
        missing = [p for p in accepted if p not in params and sig.parameters[p].default is inspect.Parameter.empty]
        what = f"unknown key {key}.{unknown[0]}" if unknown else f"missing key {key}.{missing[0]}"
        raise UserError(f"{what}; {node._target_} takes {', '.join(accepted)}") from None
    return functools.partial(fn, **params)


def check_nested_targets(value, key: str, extra: Iterable[str] = ()) -> None:
    """Every `_target_` inside a stage key's value is allow-listed (and importable)."""
    if isinstance(value, dict):
        if "_target_" in value:
            locate(value["_target_"], key, extra)
        for k, v in value.items():
            if k != "_target_":
                check_nested_targets(v, f"{key}.{k}", extra)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_nested_targets(v, f"{key}.{i}", extra)


def check_moved_targets(cfg, key: str = "") -> None:
    """A `_target_` anywhere in a composed config (Hydra callbacks included) that names a moved object."""
    if isinstance(cfg, dict):
        target = cfg.get("_target_")
        if isinstance(target, str) and target in MOVED:
            raise UserError(f"{key or 'config'}._target_: {target} has moved; use {MOVED[target]}")
        for k, v in cfg.items():
            check_moved_targets(v, f"{key}.{k}" if key else str(k))


def _source_key(node: DictConfig, param: str, key: str) -> str:
    """The config key a stage parameter comes from: `checkpoint.model` for `model: ${checkpoint.model}`."""
    raw = OmegaConf.to_container(node, resolve=False).get(param)
    if isinstance(raw, str) and raw.startswith("${") and raw.endswith("}") and ":" not in raw:
        return raw[2:-1]
    return f"{key}.{param}"
