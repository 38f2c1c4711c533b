"""The launcher's config, registered as hydra/launcher=ray (Hydra imports this module at start-up)."""

# No `from __future__ import annotations`: Hydra executes plugin modules outside sys.modules,
# where dataclasses cannot resolve string annotations.

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


def _init() -> dict[str, Any]:
    # Keyword arguments of ray.init; keys left null are not passed. address: "local" starts a
    # cluster on this machine for the sweep, "auto" joins the one running here (`ray start`),
    # "ray://head:10001" a remote one. num_cpus/num_gpus size a local cluster only.
    return {"address": "local", "num_cpus": None, "num_gpus": None, "object_store_memory": None}


def _remote() -> dict[str, Any]:
    # Options of ray.remote for each job. max_calls=1: every job gets a fresh worker process,
    # so the memory of its model (host and GPU) is returned when it ends. max_retries=0: a job
    # whose worker died is reported, not silently run again.
    return {"num_cpus": 1, "num_gpus": 0, "memory": None, "max_calls": 1, "max_retries": 0}


@dataclass
class RayConf:
    init: dict[str, Any] = field(default_factory=_init)
    remote: dict[str, Any] = field(default_factory=_remote)


@dataclass
class RayLauncherConf:
    _target_: str = "hydra_plugins.model_loader_ray.launcher.RayLauncher"
    ray: RayConf = field(default_factory=RayConf)


ConfigStore.instance().store(group="hydra/launcher", name="ray", node=RayLauncherConf, provider="model_loader_ray")
