"""`load([...overrides])` for Python programs: the same configs and stages as the CLI."""

from __future__ import annotations

import contextlib
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from .engine.compose import compose_config, keyword_overrides
from .engine.result import LoadResult
from .engine.runner import run, save_config
from .engine.write_guard import check_writes_outside
from .errors import UserError
from .parallel.launch import agree_run_dir, parallel_spec
from .parallel.spec import env_rank


def load(
    overrides=(),
    *,
    run_dir: str | Path | None = None,
    config_name: str = "config",
    config_dir: str | Path | None = None,
    **keywords,
) -> LoadResult:
    """Load a model as configured; raises UserError (bad input) or CheckFailed (a check failed).

    `config_dir`/`config_name`: your own configs, as the CLI's --config-dir/--config-name. Keywords
    (checkpoint, dtype, device_map, max_memory, quantization) are the overrides that build the same config,
    placed before `overrides`. The raised error carries `.result` (model, report, run_dir) so nothing is lost.
    """
    overrides = keyword_overrides(keywords) + [str(o) for o in overrides]
    cfg = compose_config(overrides, config_name, None if config_dir is None else str(config_dir))
    HydraConfig.instance().set_config(cfg)
    try:
        target = Path(run_dir) if run_dir is not None else Path(cfg.hydra.run.dir)
    except OmegaConfBaseException as exc:
        raise UserError(f"{getattr(exc, 'full_key', 'config')}: {str(exc).splitlines()[0]}") from None
    with open_dict(cfg):
        del cfg["hydra"]
    with contextlib.suppress(UserError):  # a bad `parallel` group: the runner reports it (report.json, exit 2)
        target = Path(agree_run_dir(parallel_spec(cfg), str(target)))  # tensor parallel: rank 0's directory
    check_writes_outside(cfg, "hydra.run.dir" if run_dir is None else "run_dir", target)  # before .hydra/
    if env_rank(cfg.get("parallel")) == 0:  # other ranks write nothing but their log
        save_config(cfg, target, overrides)
    OmegaConf.set_readonly(cfg, True)
    return run(cfg, target)
