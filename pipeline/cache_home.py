"""Where the project keeps what it makes once and reuses: built-in checkpoints, metric results.
Stdlib only: the CLI asks before anything heavy is imported."""

from __future__ import annotations

import os


def cache_dir() -> str:
    """$MODEL_LOADER_CACHE, else ~/.cache/model-loader."""
    return os.environ.get("MODEL_LOADER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "model-loader")


METRICS_ENV = "MODEL_LOADER_METRICS_CACHE"


def metrics_dir() -> str | None:
    """$MODEL_LOADER_METRICS_CACHE, else $MODEL_LOADER_CACHE/metrics; None when it is `off`."""
    value = os.environ.get(METRICS_ENV)
    if value and value.lower() in ("off", "0", "false", "none"):
        return None
    return value or os.path.join(cache_dir(), "metrics")


def write_homes() -> list[tuple[str, str]]:
    """(variable, directory) of every cache a run may write into (the metric cache's default lies in the first)."""
    metrics = metrics_dir() if os.environ.get(METRICS_ENV) else None
    return [("MODEL_LOADER_CACHE", cache_dir())] + ([(METRICS_ENV, metrics)] if metrics else [])
