"""Bind YAML stage nodes to stage functions; every `_target_` is checked by the object it resolves to.

Configs come from colleagues and the internet. A `_target_` must start with an allow-listed prefix, resolving
it imports only modules spelled under that prefix and never steps through another module's alias, and the
object itself is checked (a stage function, a torch.nn.Module class, a transformers model class). Loaders are
targets only when allow_targets names them exactly, and `trust_remote_code`-like arguments in any node are
governed by our own keys. All of it before any stage runs (docs/design.md, "Allow-listed targets").
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from ..errors import UserError

# Dotted names that moved when the package was laid out by concern: old name -> new name.
MOVED = {
    "pipeline.sweep_summary.SweepSummary": "pipeline.sweeps.summary.SweepSummary",
}
# Entry points that read files, unpickle or import code: admitted only when allow_targets names them exactly.
LOADER_NAMES = frozenset(
    {
        "from_pretrained", "from_single_file", "from_json_file", "load", "loads", "load_file",
        "load_state_dict", "get_class_from_dynamic_module", "get_class_in_module", "import_module",
    }
)  # fmt: skip
_MISSING = object()


@dataclass(frozen=True)
class Grants:
    """What the user allowed through our own keys; they govern same-named arguments in every node."""

    trust_remote_code: bool = False
    allow_pickle: bool = False


# node keyword -> (our key that governs it, whether the given value asks for that permission)
GOVERNED = {
    "trust_remote_code": ("trust_remote_code", lambda v: v not in (False, None)),
    "weights_only": ("allow_pickle", lambda v: v not in (True, None)),  # torch.load: full unpickling
    "allow_pickle": ("allow_pickle", lambda v: v not in (False, None)),  # numpy.load
}


def grants_of(cfg) -> Grants:
    """checkpoint.trust_remote_code / allow_pickle as booleans (a string "false" must never mean yes)."""
    node = cfg.get("checkpoint") if cfg is not None else None
    values = {}
    for name in ("trust_remote_code", "allow_pickle"):
        value = node.get(name, False) if node is not None else False
        value = False if value is None else value
        if not isinstance(value, bool):
            raise UserError(f"checkpoint.{name}: {value!r} is not a boolean; set checkpoint.{name}=true or false")
        values[name] = value
    return Grants(**values)


def is_allowed(target: str, extra: Iterable[str] = ()) -> bool:
    """Whether the spelling may be resolved at all (the object it resolves to is checked after)."""
    return bool(_rules(target, extra))


def _rules(target: str, extra: Iterable[str], builtins: dict | None = None) -> list[tuple[str, Callable]]:
    """(import root, object check) for every allow-list entry whose spelling matches `target`, user's first."""
    if not isinstance(target, str) or any(not p for p in target.split(".")) or "." not in target:
        return []
    found = []
    for entry in map(str, list(extra or ())):
        if target == entry:
            found.append((target + ".", lambda obj: ""))  # named exactly: the user meant this object
        elif entry.endswith(".*") and target.startswith(entry[:-1]):
            found.append((entry[:-1], _within(entry[:-1])))
    builtins = _BUILTIN_CHECKS if builtins is None else builtins
    found += [(p, check) for p, check in builtins.items() if target.startswith(p)]
    return found


def locate(target, key: str, extra: Iterable[str] = (), builtins: dict | None = None):
    """The object `target` names, if allow-listed by spelling and by identity; UserError before importing otherwise."""
    if not isinstance(target, str) or not target:
        raise UserError(f"{key}._target_: missing or not a dotted name")
    if target in MOVED:
        raise UserError(f"{key}._target_: {target} has moved; use {MOVED[target]}")
    rules = _rules(target, extra, builtins)
    if not rules:
        admitted = ", ".join(f"{p}*" for p in (_BUILTIN_CHECKS if builtins is None else builtins))
        raise UserError(
            f"{key}._target_: {target} is not allow-listed; only {admitted} "
            f"or names listed in allow_targets may be instantiated"
        )
    refusal = None
    for root, check in rules:
        obj = resolve(target, root, key)
        why = check(obj)
        if not why:
            return obj
        refusal = refusal or f"{key}._target_: {target} resolves to {identity(obj)}, {why}"
    raise UserError(refusal)


def resolve(target: str, root: str, key: str):
    """Import `target` importing only modules spelled under `root` (or its parent packages).

    Past a module reached under another name (`...module.torch` is the module torch) only
    attributes already set are followed: nothing more is imported, and the identity check
    then sees the real object (torch.serialization.load).
    """
    parts = target.split(".")
    obj, spelled, aliased = _import(parts[0], root, key, target), parts[0], False
    for part in parts[1:]:
        aliased = aliased or (inspect.ismodule(obj) and obj.__name__ != spelled)
        spelled = f"{spelled}.{part}"
        try:
            child = vars(obj).get(part, _MISSING) if aliased and inspect.ismodule(obj) else getattr(obj, part, _MISSING)
        except Exception as exc:  # a lazy module failing to import its own part
            raise UserError(
                f"{key}._target_: cannot import {target} ({_first_line(exc)}); check the spelling"
            ) from None
        if child is _MISSING and inspect.ismodule(obj) and not aliased:
            child = _import(spelled, root, key, target)
        if child is _MISSING:
            raise UserError(f"{key}._target_: cannot import {target} (no {spelled}); check the spelling")
        obj = child
    return obj


def _import(name: str, root: str, key: str, target: str):
    if not ((name + ".").startswith(root) or root.startswith(name + ".")):
        raise UserError(
            f"{key}._target_: {target} would import {name}, outside {root}*; name the object where it is defined"
        )
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and name != exc.name and not name.startswith(exc.name + "."):
            raise UserError(f"{key}._target_: cannot import {target} (ModuleNotFoundError: {exc.name})") from None
        return _MISSING
    except Exception as exc:
        raise UserError(f"{key}._target_: cannot import {target} ({_first_line(exc)}); check the spelling") from None


def _first_line(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {(str(exc).splitlines() or [''])[0][:160]}"


def identity(obj) -> str:
    """Where an object is really defined: module.qualname (a bound method: its class's, then the method)."""
    if inspect.ismodule(obj):
        return obj.__name__
    owner = getattr(obj, "__self__", None)
    if inspect.ismethod(obj) and inspect.isclass(owner):
        return f"{owner.__module__}.{owner.__qualname__}.{obj.__name__}"
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__qualname__
    return f"{getattr(obj, '__module__', None) or '?'}.{name}"


def _within(prefix: str) -> Callable:
    """An allow_targets `prefix.*` entry: the object must be defined under it, and not be a loader."""

    def check(obj) -> str:
        name = identity(obj)
        if not name.startswith(prefix):
            return f"which is not under {prefix}* (allow_targets)"
        if name.rpartition(".")[2] in LOADER_NAMES:
            return "a loader entry point (reads files, unpickles or imports code); name it exactly in allow_targets"
        return ""

    return check


def _stage_check(obj) -> str:
    module = getattr(obj, "__module__", None) or ""
    if (
        inspect.isfunction(obj)
        and module.startswith("pipeline.stages.")
        and obj.__qualname__ == module.rpartition(".")[2]
    ):
        return ""
    return "not a stage function (pipeline.stages.<name>.<name>); list your own stages in allow_targets"


def _torch_nn_check(obj) -> str:
    import torch

    if inspect.isclass(obj) and issubclass(obj, torch.nn.Module) and obj.__module__.startswith("torch.nn."):
        return ""
    return "not a torch.nn.Module class defined in torch.nn; list other objects in allow_targets"


def _transformers_check(obj) -> str:
    owner, method = obj, None
    if inspect.ismethod(obj) and inspect.isclass(obj.__self__):
        owner, method = obj.__self__, obj.__name__
    if not is_model_class(owner):
        return "not a transformers model class; name a model class such as transformers.LlamaForCausalLM"
    if method not in (None, "from_config", "_from_config"):
        return (
            f"{method} of a model class, not the class: loaders read files or import code; name the class, "
            "or list the exact name in allow_targets"
        )
    return ""


def is_model_class(obj) -> bool:
    """A transformers model class or auto model class, defined in transformers itself (not a checkpoint's code)."""
    from ..hf.modeling import is_model_class as builds_from_config

    return inspect.isclass(obj) and obj.__module__.startswith("transformers.") and builds_from_config(obj)


def _callback_check(obj) -> str:
    from hydra.experimental.callback import Callback

    module = getattr(obj, "__module__", None) or ""
    if inspect.isclass(obj) and issubclass(obj, Callback) and module.startswith(tuple(_CALLBACK_CHECKS)):
        return ""
    return "not a Hydra callback class defined in pipeline.sweeps or hydra.experimental.callbacks"


_BUILTIN_CHECKS = {"pipeline.stages.": _stage_check, "torch.nn.": _torch_nn_check, "transformers.": _transformers_check}
_CALLBACK_CHECKS = {"pipeline.sweeps.": _callback_check, "hydra.experimental.callbacks.": _callback_check}
HYDRA_PLUGIN_PREFIXES = ("hydra_plugins.", "hydra._internal.core_plugins.")


def check_hydra_targets(cfg: dict) -> None:
    """Hydra instantiates its launcher, sweeper and callbacks itself, before any stage runs, so the CLI checks
    them when it composes: a launcher or sweeper is a Hydra plugin (by spelling: Hydra then checks it is a
    Plugin class), a callback by identity; allow_targets admits others as it does for stages."""
    extra = [str(e) for e in (cfg.get("allow_targets") or []) if isinstance(e, str)]
    hydra = cfg.get("hydra") or {}
    for group in ("launcher", "sweeper"):
        target = (hydra.get(group) or {}).get("_target_")
        if target is None or (isinstance(target, str) and target.startswith(HYDRA_PLUGIN_PREFIXES)):
            continue
        if not any(rule for rule in _rules(target, extra, {})):
            raise UserError(
                f"hydra.{group}._target_: {target} is not a Hydra plugin ({', '.join(p + '*' for p in HYDRA_PLUGIN_PREFIXES)}); "
                f"choose one with hydra/{group}=<name>"
            )
        locate(target, f"hydra.{group}", extra, {})
    for name, node in (hydra.get("callbacks") or {}).items():
        if isinstance(node, dict) and "_target_" in node:
            locate(node["_target_"], f"hydra.callbacks.{name}", extra, _CALLBACK_CHECKS)


def bind_stage(name: str, node: DictConfig, extra: Iterable[str] = (), grants: Grants = Grants()) -> Callable:
    """A stage callable `fn(ctx)` whose YAML keys were checked against the function's signature."""
    key = f"stages.{name}"
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise UserError(f"{key}: a stage node needs _target_ and _partial_: true; see pipeline/conf/stages/")
    fn = locate(node._target_, key, extra)
    params = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not k.startswith("_")}
    check_governed(params, key, grants)
    for param, value in params.items():
        check_nested_targets(value, _source_key(node, param, key), extra, grants)
    sig = inspect.signature(fn)
    try:
        sig.bind(None, **params)
    except TypeError:
        accepted = [p for p in list(sig.parameters)[1:]]
        unknown = [k for k in params if k not in sig.parameters]
        missing = [p for p in accepted if p not in params and sig.parameters[p].default is inspect.Parameter.empty]
        what = f"unknown key {key}.{unknown[0]}" if unknown else f"missing key {key}.{missing[0]}"
        raise UserError(f"{what}; {node._target_} takes {', '.join(accepted)}") from None
    hints = _type_hints(fn)
    for param, value in params.items():
        if param in hints:
            params[param] = check_value(value, hints[param], _source_key(node, param, key))
    return functools.partial(fn, **params)


def _type_hints(fn) -> dict:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an annotation that does not evaluate gives nothing to check by
        return {}


def check_value(value, hint, key: str):
    """`value` as the annotation `hint` asks, or UserError naming `key`: a bad YAML value is exit 2 when the
    stages are bound, before any stage runs. Numbers in stage signatures are counts, sizes and tolerances:
    finite and >= 0. A number given for a string is that string (Hydra reads `prompt=2024` as an int).
    A type with a `parse(value, key)` (sizes.MaxMemory, device_map.ExplicitMap: what the schema cannot type)
    is parsed here, once, so the stage receives the typed value and never a raw map."""
    parse = getattr(hint, "parse", None)
    if isinstance(hint, type) and callable(parse):
        return parse(value, key)
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if _fits(value, option):
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and option in (int, float)
            if number and not (math.isfinite(value) and value >= 0):
                raise UserError(f"{key}: {value!r} is not a count, size or tolerance; give a number >= 0")
            if typing.get_origin(option) is dict and len(typing.get_args(option)) == 2:
                return {k: check_value(v, typing.get_args(option)[1], f"{key}.{k}") for k, v in value.items()}
            return str(value) if option is str and not isinstance(value, str) else value
    wanted = " or ".join(_describe(o) for o in options)
    raise UserError(f"{key}: {value!r} is not {wanted}; set {key} to {wanted}")


def _fits(value, option) -> bool:
    origin, args = typing.get_origin(option), typing.get_args(option)
    if option is type(None) or option is None:
        return value is None
    if option is bool:
        return isinstance(value, bool)
    if option is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if option is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if option is str:
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    if option is dict or origin is dict:
        return isinstance(value, dict)
    if origin in (list, tuple) or option in (list, tuple):
        inner = args[0] if args else typing.Any
        return isinstance(value, (list, tuple)) and all(inner is typing.Any or _fits(v, inner) for v in value)
    return True  # a type YAML cannot spell (the LoadContext, Any): nothing to check


def _describe(option) -> str:
    origin, args = typing.get_origin(option), typing.get_args(option)
    if origin in (list, tuple) or option in (list, tuple):
        return f"a list of {_describe(args[0])}s".replace("a list of a ", "a list of ") if args else "a list"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(option, "a mapping {key: value, ...}" if option is dict or origin is dict else str(option))


def check_nested_targets(value, key: str, extra: Iterable[str] = (), grants: Grants = Grants()) -> None:
    """Every `_target_` inside a stage key's value is admitted (spelling, then identity), and every
    trust_remote_code / weights_only / allow_pickle in it is one our keys allow. A transformers
    loader the user admitted gets `trust_remote_code` from checkpoint.trust_remote_code when the
    node does not say, so transformers never asks on the terminal."""
    if isinstance(value, dict):
        obj = locate(value["_target_"], key, extra) if "_target_" in value else None
        check_governed(value, key, grants)
        if _asks_trust(obj) and "trust_remote_code" not in value:
            value["trust_remote_code"] = grants.trust_remote_code
        for k, v in value.items():
            if k != "_target_":
                check_nested_targets(v, f"{key}.{k}", extra, grants)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_nested_targets(v, f"{key}.{i}", extra, grants)


def check_governed(node: dict, key: str, grants: Grants) -> None:
    """A node asking for remote code or full unpickling needs our own key to allow it (exit 2 naming both)."""
    for arg, (ours, asks) in GOVERNED.items():
        if arg in node and asks(node[arg]) and not getattr(grants, ours):
            raise UserError(
                f"{key}.{arg}: {node[arg]!r} needs checkpoint.{ours}=true, and checkpoint.{ours} is false; "
                f"set checkpoint.{ours}=true only for files you trust, or remove {key}.{arg}"
            )


def _asks_trust(obj) -> bool:
    """transformers entry points that decide trust_remote_code themselves (prompting) when not told."""
    owner = getattr(obj, "__self__", None)
    if not (inspect.ismethod(obj) and inspect.isclass(owner) and owner.__module__.startswith("transformers")):
        return False
    from ..hf.modeling import is_concrete_model_class

    return obj.__name__ == "from_pretrained" or (obj.__name__ == "from_config" and not is_concrete_model_class(owner))


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
