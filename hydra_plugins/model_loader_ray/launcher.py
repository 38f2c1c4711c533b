"""RayLauncher: every job of a sweep batch is a Ray task; the driver waits for all of them.

The job side is Hydra's own `run_job` (run dir, .hydra/, callbacks), as in Hydra's joblib
and submitit launchers; this module only ships the job to a Ray worker and its JobReturn
back. Ray is imported when a sweep launches, not when Hydra discovers plugins.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.errors import CompactHydraException
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


def _options(node: Any) -> dict[str, Any]:
    """A config mapping as keyword arguments, null values left out (Ray's defaults apply)."""
    if node is None:
        return {}
    items = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    return {k: v for k, v in items.items() if v is not None}


def _run_job(
    hydra_context: HydraContext, config: DictConfig, task_function: TaskFunction, singletons: dict
) -> JobReturn:
    """Runs on the Ray worker: Hydra's state back, the sweep's working directory, then run_job."""
    import ray

    setup_globals()
    Singleton.set_state(singletons)
    cwd = config.hydra.runtime.cwd
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)  # relative paths mean what they meant where the sweep was started
    with open_dict(config.hydra.job):
        config.hydra.job.id = ray.get_runtime_context().get_task_id()
    return run_job(
        hydra_context=hydra_context,
        task_function=task_function,
        config=config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )


class RayInitError(CompactHydraException):
    """ray.init refused the configured options: Hydra prints this one line (the CLI exits 2)."""


def start_ray(init: dict[str, Any]) -> None:
    import ray

    if ray.is_initialized():
        log.info("Ray is already initialized in this process: using it")
        return
    log.info(f"ray.init({', '.join(f'{k}={v!r}' for k, v in init.items())})")
    try:
        ray.init(**init)
    except (ConnectionError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise RayInitError(
            f"hydra.launcher.ray.init (address={init.get('address')!r}): {reason} "
            "Fix: address=local starts a cluster here; address=auto needs `ray start --head` on this machine "
            "first; num_cpus/num_gpus only size a local cluster."
        ) from None


class RayLauncher(Launcher):
    def __init__(self, ray: Any = None) -> None:
        self.ray_cfg = ray
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        # Absolute and resolved once here: a worker resolves neither ${now:} nor a relative path
        # the way this process does.
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Ray launcher: {len(job_overrides)} jobs, sweep output dir {sweep_dir}")
        start_ray(_options(self.ray_cfg.init if self.ray_cfg else None))
        options = _options(self.ray_cfg.remote if self.ray_cfg else None)
        remote = ray.remote(**options)(_run_job) if options else ray.remote(_run_job)
        refs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(config):
                config.hydra.sweep.dir = str(sweep_dir)
                config.hydra.job.num = idx
                config.hydra.job.id = f"job_id_for_{idx}"  # the Ray task id, set on the worker
            refs.append(remote.remote(self.hydra_context, config, self.task_function, Singleton.get_state()))
        returns = ray.get(refs)
        for ret in returns:
            out = Path(str(ret.hydra_cfg.hydra.runtime.output_dir)) if ret.hydra_cfg else None
            if out is not None and not out.is_dir():
                log.warning(
                    f"job {ret.hydra_cfg.hydra.job.num}: its run directory {out} is not visible here, so the sweep "
                    "summary cannot read it; put hydra.sweep.dir on a filesystem every Ray node shares"
                )
        return returns
