"""Where the project keeps what it makes once and reuses: built-in checkpoints, metric results.
Stdlib only: the CLI asks before anything heavy is imported."""

from __future__ import annotations

import os


def cache_dir() -> str:
    """$MODEL_LOADER_CACHE, else ~/.cache/model-loader."""
    return os.environ.get("MODEL_LOADER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "model-loader")


METRICS_ENV = "MODEL_LOADER_METRICS_CACHE"
_OFF = ("off", "0", "false", "none")


def write_homes() -> list[tuple[str, str]]:
    """(variable, directory) of every cache a run may write into (the metric cache's default lies in the first)."""
    out = [("MODEL_LOADER_CACHE", cache_dir())]
    metrics = os.environ.get(METRICS_ENV)
    if metrics and metrics.lower() not in _OFF:
        out.append((METRICS_ENV, metrics))
    return out
