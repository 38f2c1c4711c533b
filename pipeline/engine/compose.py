"""The job config exactly as `python -m pipeline <overrides>` sees it, composed without torch.

Kept apart from the API (which imports the runner, hence torch) so that the CLI can compose,
check the overrides and start reading shards before torch and the model code are imported.
"""

from __future__ import annotations

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import UserError
from .binding import check_moved_targets


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
