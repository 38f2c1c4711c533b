"""Hydra config package (`pkg://pipeline.conf`; our namespace, so a project's own top-level `conf` never shadows
it): presets over pipeline/schema.py."""

import pipeline.engine.resolvers  # noqa: F401  (resolvers the configs use)
from pipeline.schema import register

register()  # each group's `_schema`, which every preset lists first in its defaults
