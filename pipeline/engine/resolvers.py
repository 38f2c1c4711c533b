"""OmegaConf resolvers used by pipeline/conf/ (registered on import, cheaply: no torch)."""

import os

from omegaconf import OmegaConf


def _run_name(path, fallback) -> str:
    """Runs are grouped by checkpoint: the directory's name, or the built-in model's name."""
    if path:
        return os.path.basename(os.path.normpath(str(path))).removesuffix(".safetensors") or str(fallback)
    return str(fallback)


if not OmegaConf.has_resolver("run_name"):
    OmegaConf.register_new_resolver("run_name", _run_name)
