"""Hydra config package (compose with initialize_config_module("conf")): presets over pipeline/schema.py."""

import pipeline.engine.resolvers  # noqa: F401  (resolvers the configs use)
from pipeline.schema import register

register()  # each group's `_schema`, which every preset lists first in its defaults
