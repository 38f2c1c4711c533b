"""Hydra config package (compose with initialize_config_module("conf"))."""

import pipeline.engine.resolvers  # noqa: F401  (resolvers the configs use)
