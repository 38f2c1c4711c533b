"""Hydra config package (compose with initialize_config_module("conf"))."""

import pipeline.resolvers  # noqa: F401  (resolvers the configs use)
