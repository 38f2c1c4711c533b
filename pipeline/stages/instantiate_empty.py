"""Stage 1: the model skeleton on the meta device, no weight memory allocated.

Also records what later stages need from the architecture: tied parameter
groups (loaded once, kept on one device), no-split module classes (never cut
across devices) and modules transformers keeps in fp32.
"""
from __future__ import annotations

import json
import logging
import os

import torch
from accelerate import init_empty_weights
from accelerate.utils import find_tied_parameters
from hydra.utils import instantiate

from ..context import LoadContext
from ..errors import UserError
from ..recipes import ensure_builtin
from ..targets import locate

log = logging.getLogger(__name__)


def instantiate_empty(ctx: LoadContext, *, path: str | None, builtin: str | None = None, model: dict | None = None,
                      allow_targets: list[str] | None = None) -> None:
    if not path and not builtin:
        raise UserError("checkpoint.path: no checkpoint given; set checkpoint.path=/path/to/model")
    path = os.path.abspath(os.path.expanduser(str(path))) if path else ensure_builtin(builtin)
    if not os.path.exists(path):
        raise UserError(f"checkpoint.path: {path} does not exist; point checkpoint.path at a model directory or .safetensors file")
    ctx.checkpoint_path = path
    target = locate(model.get("_target_"), "checkpoint.model", allow_targets or ()) if model is not None else None
    config = _read_config(path) if target is None or _is_model_class(target) else None
    with init_empty_weights(include_buffers=False):
        module = _build(target, model, config)
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"checkpoint.model: {model.get('_target_')} built a {type(module).__name__}, not a torch.nn.Module")
    if hasattr(module, "tie_weights"):
        module.tie_weights()  # transformers 5 ties only when asked; the groups are what we need
    module.eval()
    ctx.model = module
    ctx.model_config = config
    ctx.tied_groups = [sorted(g) for g in find_tied_parameters(module)]
    ctx.no_split = sorted(getattr(module, "_no_split_modules", None) or [])
    ctx.keep_in_fp32 = sorted(getattr(module, "_keep_in_fp32_modules", None) or [])
    n_params = sum(p.numel() for p in module.parameters())
    ctx.report["model"] = {
        "class": type(module).__name__,
        "parameters": n_params,
        "tied_groups": ctx.tied_groups,
        "no_split_modules": ctx.no_split,
    }
    log.info("skeleton %s: %d parameters on meta, %d tied groups", type(module).__name__, n_params, len(ctx.tied_groups))


def _read_config(path: str):
    from transformers import AutoConfig

    cfg_file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    if not os.path.isfile(cfg_file):
        raise UserError(f"{path}: no config.json; add it or set checkpoint.model to a model _target_")
    try:
        with open(cfg_file) as fh:
            json.load(fh)
        return AutoConfig.from_pretrained(os.path.dirname(cfg_file), local_files_only=True)
    except json.JSONDecodeError:
        raise UserError(f"{cfg_file}: not valid JSON; fix or re-save the config") from None
    except (ValueError, KeyError) as exc:
        raise UserError(f"{cfg_file}: transformers cannot read it ({str(exc).splitlines()[0][:120]}); check model_type") from None


def _is_model_class(obj) -> bool:
    return isinstance(obj, type) and (hasattr(obj, "_from_config") or hasattr(obj, "from_config"))


def _build(obj, node: dict | None, config):
    """The skeleton: a model class built from config.json (node keys override it), or any allow-listed factory."""
    if node is None:
        return build_from_config(_auto_class(config), config)
    if _is_model_class(obj):
        for key, value in node.items():  # extra keys override config.json fields
            if not key.startswith("_"):
                setattr(config, key, value)
        return build_from_config(obj, config)
    try:
        return instantiate(node, _convert_="all")
    except Exception as exc:
        raise UserError(f"checkpoint.model: {node.get('_target_')} failed to build ({exc.__class__.__name__}: {str(exc)[:160]}); check its keys") from None


def build_from_config(cls, config):
    """A transformers model class (or auto class) built from a config, as from_pretrained would."""
    builder = getattr(cls, "_from_config", None) or cls.from_config
    return builder(config)


def _auto_class(config):
    """The class named in config.json's architectures, else the auto class for its task."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel
