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
        with initialize_config_module("conf", version_base="1.3"):
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
