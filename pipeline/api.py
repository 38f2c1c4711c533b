"""`load([...overrides])` for Python programs: the same configs and stages as the CLI."""

from __future__ import annotations

import contextlib
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from .engine.binding import check_moved_targets
from .engine.result import LoadResult
from .engine.runner import run, save_config
from .errors import UserError
from .parallel.launch import agree_run_dir, parallel_spec
from .parallel.spec import env_rank


def compose_config(overrides=(), config_name: str = "config"):
    """The job config (with its `hydra` node) exactly as `python -m pipeline <overrides>` sees it."""
    overrides = [str(o) for o in overrides]
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_module("conf", version_base="1.3"):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(f"overrides: {_one_line(str(exc))}") from None
    check_moved_targets(OmegaConf.to_container(cfg, resolve=False))
    return cfg


def _one_line(message: str) -> str:
    """Hydra's multi-line composition errors as one line: the problem, then the valid choices."""
    lines = [ln.strip() for ln in message.split("Config search path:")[0].splitlines() if ln.strip()]
    head, rest = lines[0], lines[1:]
    if rest and rest[0].startswith("Available options"):
        return f"{head}; choose one of: {', '.join(rest[1:])}"
    return "; ".join([head, *rest])


def load(overrides=(), *, run_dir: str | Path | None = None, config_name: str = "config") -> LoadResult:
    """Load a model as configured; raises UserError (bad input) or CheckFailed (a check failed).

    The raised error carries `.result` (model, report, run_dir) so nothing is lost.
    """
    overrides = [str(o) for o in overrides]
    cfg = compose_config(overrides, config_name)
    HydraConfig.instance().set_config(cfg)
    try:
        target = Path(run_dir) if run_dir is not None else Path(cfg.hydra.run.dir)
    except OmegaConfBaseException as exc:
        raise UserError(f"{getattr(exc, 'full_key', 'config')}: {str(exc).splitlines()[0]}") from None
    with open_dict(cfg):
        del cfg["hydra"]
    with contextlib.suppress(UserError):  # a bad `parallel` group: the runner reports it (report.json, exit 2)
        target = Path(agree_run_dir(parallel_spec(cfg), str(target)))  # tensor parallel: rank 0's directory
    if env_rank(cfg.get("parallel")) == 0:  # other ranks write nothing but their log
        save_config(cfg, target, overrides)
    OmegaConf.set_readonly(cfg, True)
    return run(cfg, target)
