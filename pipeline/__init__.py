"""A declarative, Hydra-configured pipeline that loads large PyTorch models under memory limits.

`from pipeline import load` is the Python API; `python -m pipeline` the CLI.
Imports stay lazy so that `import pipeline` (and Hydra reading pipeline/conf/) is cheap.
"""

from .engine import resolvers  # noqa: F401  (registers the config resolvers)


def load(overrides=(), **kwargs):
    """Compose the config with `overrides`, run the stages, return a LoadResult. See pipeline.api."""
    from .api import load as _load

    return _load(overrides, **kwargs)


__all__ = ["load"]
