"""Where the project keeps what it makes once and reuses: built-in checkpoints, metric results.
Stdlib only: the CLI asks before anything heavy is imported."""

from __future__ import annotations

import os


def cache_dir() -> str:
    """$MODEL_LOADER_CACHE, else ~/.cache/model-loader."""
    return os.environ.get("MODEL_LOADER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "model-loader")
