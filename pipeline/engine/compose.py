"""The job config exactly as `python -m pipeline <overrides>` sees it, composed without torch.

Kept apart from the API (which imports the runner, hence torch) so that the CLI can compose,
check the overrides and start reading shards before torch and the model code are imported.
"""

from __future__ import annotations

import os
import re

import yaml
from hydra import compose, initialize_config_module
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import UserError
from ..schema import GROUPS, check_keys, closest, register, type_error
from .binding import check_hydra_targets, check_moved_targets

# A YAML tag where an override's value (or an element of it) starts: `key=!!python/object/apply:os.system [...]`
_TAG_IN_OVERRIDE = re.compile(r"(^[^=]*=|[\[{,:])\s*!!\w")


def compose_config(overrides=(), config_name: str = "config", config_dir: str | None = None):
    """The job config (with its `hydra` node) exactly as `python -m pipeline <overrides>` sees it
    (`config_dir`: the CLI's --config-dir, searched as Hydra searches it)."""
    overrides = [str(o) for o in overrides]
    _refuse_tags(overrides)
    register()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_module("pipeline.conf", version_base="1.3"):
            if config_dir is not None:
                _add_config_dir(config_dir)
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(composition_error(exc)) from None
    except yaml.YAMLError as exc:  # a config file that is not plain YAML data (a !!python tag, bad syntax)
        raise UserError(_yaml_error(exc)) from None
    check_keys(cfg, overrides)
    container = OmegaConf.to_container(cfg, resolve=False)
    check_moved_targets(container)
    check_hydra_targets(container)
    check_permissions_given(container, overrides, config_name)
    return cfg


# Keys that let code run (a checkpoint's own modeling code, pickles, loaders named as targets).
PERMISSIONS = ("checkpoint.trust_remote_code", "checkpoint.allow_pickle", "allow_targets")


def check_permissions_given(container: dict, overrides: list[str], config_name: str) -> None:
    """A permission holds only when the command line or load() gives it: a config file (someone else's YAML,
    an experiment preset) that grants one is exit 2 naming the key to pass instead."""
    given = {re.sub(r"^[+~]+", "", o).split("=", 1)[0].strip() for o in overrides}
    for key in PERMISSIONS:
        node = container
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node and node is not False and key not in given:
            raise UserError(
                f"{key}: granted by a config file (config {config_name!r} or a group it selects), not by you; "
                f"permissions that let code run are given on the command line or in load(): add {key}="
                f"{'true' if node is True else '[...]'} if you trust it"
            )


def _refuse_tags(overrides: list[str]) -> None:
    """YAML tags construct Python objects: no value of ours needs one, and an override never carries one."""
    for override in overrides:
        if _TAG_IN_OVERRIDE.search(override):
            raise UserError(f"overrides: {override}: YAML tags (!!...) are refused; write the plain value")


def _yaml_error(exc: yaml.YAMLError) -> str:
    """One line naming the file and line, and a !!python (or any unknown) tag as refused."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{mark.name}, line {mark.line + 1}" if mark is not None else "a config file"
    tag = re.search(r"tag '([^']+)'", str(exc))
    if tag:
        shown = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        return f"{where}: YAML tag {shown} is refused (tags construct Python objects); write the plain value"
    return f"{where}: not valid YAML ({str(exc).splitlines()[0]}); fix the file"


def _add_config_dir(config_dir: str) -> None:
    """The search path Hydra makes for --config-dir: that directory before Hydra's own schema entries."""
    path = os.path.abspath(config_dir)
    if not os.path.isdir(path):
        raise UserError(f"--config-dir: {path} is not a directory; name an existing config directory")
    from hydra._internal.config_repository import ConfigRepository  # Hydra builds it from the search path once

    loader = GlobalHydra.instance().config_loader()
    search_path = loader.get_search_path()
    search_path.prepend(provider="command-line", path=f"file://{path}", anchor=SearchPathQuery(provider="schema"))
    loader.repository = ConfigRepository(config_search_path=search_path)  # hydra-core 1.3 (pinned <1.4)


_DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}  # a torch.dtype given


KEYWORDS = ("checkpoint", "dtype", "device_map", "max_memory", "quantization")


def keyword_overrides(keywords: dict) -> list[str]:
    """load()'s keywords as the command-line overrides that build the same config (recorded as such in
    .hydra/overrides.yaml, so the run is repeatable from the shell): a path or {key: value} for checkpoint,
    a group option or {key: value} for quantization, a strategy or an explicit {module: device} map."""
    for name in keywords:
        if name not in KEYWORDS:
            raise UserError(f"load({name}=...): unknown keyword; {closest(name, KEYWORDS)}")
    checkpoint, dtype, device_map, max_memory, quantization = (keywords.get(k) for k in KEYWORDS)
    out: list[str] = []
    if checkpoint is not None:
        node = {"path": str(checkpoint)} if isinstance(checkpoint, (str, os.PathLike)) else dict(checkpoint)
        out += ["checkpoint=hf_dir", *(f"checkpoint.{k}={_value(v)}" for k, v in node.items())]
    if dtype is not None:
        out.append(f"dtype={_key(_DTYPE_NAMES.get(str(dtype), str(dtype)))}")
    if device_map is not None:
        if isinstance(device_map, str):
            out.append(f"device_map={_key(device_map)}")
        else:
            out += ["device_map=explicit", f"device_map.map={_value(dict(device_map))}"]
    if max_memory is not None:
        out.append(f"memory.max_memory={_value(dict(max_memory))}")
    if quantization is not None:
        node = {"method": quantization} if isinstance(quantization, str) else dict(quantization)
        method = node.pop("method", "int8")
        out += [f"quantization={_key(method)}", *(f"quantization.{k}={_value(v)}" for k, v in node.items())]
    return out


def _value(value) -> str:
    """A Python value in Hydra's override grammar (strings quoted, so no character of a path is syntax)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)}: {_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    text = str(value)
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _key(key) -> str:
    """A mapping key as Hydra's grammar takes it: unquoted (device indices stay integers, globs stay globs)."""
    text = str(key)
    if not _DICT_KEY.fullmatch(text):
        raise UserError(f"load(): key {text!r} cannot be written as an override key; use letters, digits and _-./*?")
    return text


_DICT_KEY = re.compile(r"[\w/\-+.$%*@?|]+")


def without_sweeps(overrides: list[str]) -> list[str]:
    """The overrides a multirun's driver composes with: sweep values (a=1,2) left out (they vary per job)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return overrides  # composing names the bad one
    return [o.input_line for o in parsed if not o.is_sweep_override()]


def composition_error(exc: Exception) -> str:
    """Any composition error as one line naming the key: an unknown key with the closest valid one, a value
    of the wrong type with the type wanted, Hydra's own errors without the search path."""
    message = str(exc)
    unknown = re.match(r"Could not override '([^']+)'", message)
    if unknown:
        key = unknown.group(1)
        group, _, leaf = key.partition(".")
        if group in GROUPS and "." not in leaf:
            return f"{key}: unknown key; {closest(leaf, GROUPS[group].__dataclass_fields__, group + '.')}"
        return f"{key}: unknown key; check the spelling (Hydra's hint: +{key}=... adds a key, for keys a mapping takes)"
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, OmegaConfBaseException) or isinstance(cause, OmegaConfBaseException):
        error = exc if isinstance(exc, OmegaConfBaseException) else cause
        if getattr(error, "full_key", None):
            return type_error(error)
    return f"overrides: {_one_line(message)}"


def _one_line(message: str) -> str:
    """Hydra's multi-line composition errors as one line: the problem, then the valid choices."""
    lines = [ln.strip() for ln in message.split("Config search path:")[0].splitlines() if ln.strip()]
    head, rest = lines[0], lines[1:]
    if rest and rest[0].startswith("Available options"):
        options = [o for o in rest[1:] if not o.startswith("_")]  # `_schema`: the group's type, not a choice
        return f"{head}; choose one of: {', '.join(options)}"
    return "; ".join([head, *rest])
