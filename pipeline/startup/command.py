"""What the command does before Hydra starts: the collector's thresholds, the pre-flight composition
(one line and exit 2 for bad input), the signals, and our own `--help`, `--version` and completion.

The top of the start-up package (it composes through engine/compose.py): only the CLI imports it.
"""

from __future__ import annotations

import gc
import os
import sys

# Python's defaults cost a CLI run (~400k tracked objects) seven full collections and a pass at exit; rarer
# young collections keep cyclic garbage bounded (docs/design.md, "The CLI process and the cyclic collector").
GC_THRESHOLDS = (50_000, 20, 100)


def begin(args: list[str]) -> list[str]:
    """Steps 1-3 of the order in pipeline/startup/__init__.py, for `args` (sys.argv[1:]); the arguments Hydra gets."""
    gc.set_threshold(*GC_THRESHOLDS)
    from .usage import answer

    answer(args)  # --help, --version, -sc install=bash: printed here, exit 0
    cfg = preflight(args)
    from ..engine.signals import raise_on_signals

    raise_on_signals()  # Hydra's start and torch's import too: SIGTERM ends in one line, exit 143
    return _shared_run_dir(args, cfg)


def preflight(args: list[str]):
    """Compose once before Hydra does, so a bad override or config file ends in one clear line and exit 2,
    and Hydra's own callbacks, launcher and sweeper are checked before Hydra instantiates them.
    The composed config, or None when nothing was composed here."""
    from .usage import split_args

    split = split_args(args)
    if split is None or not (args or _near_the_cache()):
        return None  # --cfg, --info...: Hydra's own; no overrides and far from the cache: nothing to check
    from ..engine.compose import compose_config, without_sweeps
    from ..engine.write_guard import check_writes_outside
    from ..errors import UserError

    overrides, options = split
    multirun = options.pop("multirun", False)
    if multirun:
        overrides = without_sweeps(overrides)  # what the sweep's driver composes
    try:
        cfg = compose_config(overrides, **options)
    except UserError as exc:
        if "--multirun" in str(exc) or os.environ.get("PIPELINE_DEBUG"):
            return None  # sweep values under a config that sets hydra.mode=MULTIRUN: Hydra expands them
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:  # before Hydra makes the run directory: never inside the checkpoint
        check_writes_outside(cfg, key, _selected(cfg, key))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg


def _shared_run_dir(args: list[str], cfg) -> list[str]:
    """Under torchrun with parallel=tensor: every rank's Hydra job in rank 0's run directory (parallel/launch.py).
    `cfg`: what the pre-flight composed of `args`, else None (then composed here)."""
    if "RANK" not in os.environ or any(a.startswith("-") for a in args):
        return args
    from ..engine.compose import compose_config
    from ..errors import RankLost, UserError
    from ..parallel.launch import agree_run_dir, cli_overrides, parallel_spec

    try:
        cfg = compose_config(args) if cfg is None else cfg
        if cfg.get("parallel") is None or cfg.parallel.get("mode") != "tensor":
            return args
        parallel = parallel_spec(cfg)
        run_dir = agree_run_dir(parallel, str(cfg.hydra.run.dir))
    except UserError as exc:
        if os.environ.get("RANK", "0") == "0":  # the same line on every rank: rank 0 says it
            print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except RankLost as exc:  # another rank never joined or went away: each rank says what it saw
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    kept = [a for a in args if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    return kept + cli_overrides(parallel, run_dir)


def _near_the_cache() -> bool:
    """Without overrides the built-in checkpoint under $MODEL_LOADER_CACHE loads: worth checking only when the
    working directory (relative run directories) or the metric cache may lie inside it."""
    from ..cache_home import METRICS_ENV, cache_dir

    cwd, cache = os.path.realpath(os.getcwd()), os.path.realpath(cache_dir())
    return os.path.commonpath([cwd, cache]) == cache or bool(os.environ.get(METRICS_ENV))


def _selected(cfg, key: str) -> str | None:
    """The resolved value of `key`, or None when it cannot be resolved here (Hydra reports that itself)."""
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(cfg, key)
    except Exception:  # noqa: BLE001 - an interpolation only Hydra's job can resolve
        return None
    return None if value is None else str(value)
