"""`--help`, `--version` and shell completion as users of this command expect them.

Hydra's own help lists every file of a group (the internal `quantization: _base` too) and shows
the whole config; its `--version` is Hydra's. Ours: the groups and their choices, read from the
config repository the composed config names (`hydra.runtime.config_sources`, so `--config-dir`
and a moved config package are followed), files starting with `_` left out as internal; the main
keys with their defaults, read from the composed default config (no list kept by hand).
"""

from __future__ import annotations

import os
import sys

_COMPLETION = ("-sc", "--shell-completion")


_CONFIG_FLAGS = {
    "-cd": "config_dir",
    "--config-dir": "config_dir",
    "-cn": "config_name",
    "--config-name": "config_name",
}


def split_args(args: list[str]) -> tuple[list[str], dict] | None:
    """(overrides, config options) as Hydra reads `args`; None when a flag only Hydra handles is there."""
    overrides, options, rest = [], {}, list(args)
    while rest:
        arg = rest.pop(0)
        flag, eq, value = arg.partition("=")
        if flag in _CONFIG_FLAGS:
            options[_CONFIG_FLAGS[flag]] = value if eq else (rest.pop(0) if rest else "")
        elif arg in ("-m", "--multirun"):
            options["multirun"] = True
        elif arg.startswith("-"):
            return None
        else:
            overrides.append(arg)
    return overrides, options


def command_name() -> str:
    """How the user ran us: `model-loader` (the console script) or `python -m pipeline`."""
    argv0 = sys.argv[0]
    return "python -m pipeline" if argv0.endswith("__main__.py") or argv0 == "-m" else os.path.basename(argv0)


def answer(args: list[str]) -> None:
    """Print the help or the versions and exit 0 when `args` ask for them; refuse completion for
    `python -m pipeline` (bash would complete `python` itself); anything else: return."""
    if "--version" in args:
        print(versions())
        raise SystemExit(0)
    if "--help" in args or "-h" in args:
        print(help_text(args))
        raise SystemExit(0)
    if any(a.split("=")[0] in _COMPLETION for a in args) and command_name() == "python -m pipeline":
        print(
            "error: -sc: shell completion is for the model-loader command; run: "
            'eval "$(model-loader -sc install=bash)"',
            file=sys.stderr,
        )
        raise SystemExit(2)


def versions() -> str:
    """Ours and the libraries a load runs on, from the installed distributions (nothing imported)."""
    from ..hf.version import package_version

    def of(name: str) -> str:
        return package_version(name) or "not installed"

    libs = ", ".join(f"{n} {of(n)}" for n in ("torch", "transformers", "hydra-core", "bitsandbytes", "accelerate"))
    return f"model-loader {of('hydra-model-loader')} ({libs}; Python {sys.version.split()[0]})"


def help_text(args: list[str]) -> str:
    """The help for the config that `args` (their --config-dir/--config-name, overrides) compose."""
    from ..engine.compose import compose_config
    from ..errors import UserError

    kept = [a for a in args if a not in ("--help", "-h")]
    overrides, options = split_args(kept) or ([], {})
    options.pop("multirun", None)
    try:
        cfg = compose_config(overrides, **options)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    name = command_name()
    return "\n".join([_usage(name), "", *_groups(cfg), "", *_keys(cfg), "", *_own_configs(name)])


def _usage(name: str) -> str:
    return (
        f"{name}: load a checkpoint as the config says, prove the load, write report.json.\n\n"
        f"Usage: {name} [group=choice ...] [key=value ...] [-m] [--config-dir DIR] [--config-name NAME]\n"
        f"       {name} --version | --cfg job | --hydra-help\n"
        f'Shell completion (bash): eval "$(model-loader -sc install=bash)"'
    )


def _groups(cfg) -> list[str]:
    """Every config group with its choices (the selected one marked *)."""
    from hydra.core.object_type import ObjectType

    repo = _repository(cfg)
    chosen = {**cfg.hydra.runtime.choices, "stages": list(cfg.get("stages") or {})}
    lines = ["Config groups (group=choice; * the default):"]
    for group in sorted(repo.get_group_options("", ObjectType.GROUP)):
        if group.startswith("_") or group == "hydra":
            continue
        options = [o for o in repo.get_group_options(group, ObjectType.CONFIG) if not o.startswith("_")]
        if not options:
            continue
        marked = [f"{o}*" if _is_chosen(chosen.get(group), o) else o for o in options]
        lines.append(f"  {group:<14} {', '.join(marked)}")
    return lines


def _is_chosen(selected, option: str) -> bool:
    return option in selected if isinstance(selected, (list, tuple)) else selected == option


def _repository(cfg):
    """Hydra's config repository over the search path the composed config was made from."""
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl

    search_path = ConfigSearchPathImpl()
    for source in cfg.hydra.runtime.config_sources:
        search_path.append(source.provider, f"{source.schema}://{source.path}")
    return ConfigRepository(config_search_path=search_path)


def _keys(cfg) -> list[str]:
    """The job's keys and their defaults, one group node per line block (stage keys: --cfg job)."""
    from omegaconf import OmegaConf

    job = OmegaConf.to_container(cfg, resolve=False)
    job.pop("hydra", None)
    stages = job.pop("stages", {}) or {}
    lines = ["Keys and their defaults (key=value):"]
    for key, value in job.items():
        lines += [f"  {k} = {v}" for k, v in _leaves(key, value)]
    lines.append(f"  stages = [{', '.join(stages)}]  (each stage's keys: stages.<name>.<key>; all: --cfg job)")
    return lines


def _leaves(prefix: str, value, depth: int = 0):
    """(dotted key, shown value) of each leaf; `_target_`-style internals left out, deep mappings inline."""
    if isinstance(value, dict) and value and depth < 2 and "_target_" not in value:
        for k, v in value.items():
            if not str(k).startswith("_"):
                yield from _leaves(f"{prefix}.{k}", v, depth + 1)
        return
    yield prefix, _shown(value)


def _shown(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shown(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return str(value)


def _own_configs(name: str) -> list[str]:
    return [
        "Your own configs: a directory with a primary config (and group folders beside it, e.g. dtype/my.yaml):",
        f"  {name} --config-dir /path/to/conf --config-name myjob [overrides]",
        "  Its primary config lists `defaults:` over our groups (see pipeline/conf/config.yaml); its groups add choices.",
    ]
