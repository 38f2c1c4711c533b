"""Stage 1: the model skeleton on the meta device, no weight memory allocated (loading/skeleton.py)."""

from __future__ import annotations

import logging
import os

from ..checkpoint.builtin import ensure_builtin
from ..errors import UserError
from ..loading.skeleton import build_skeleton
from .context import LoadContext

log = logging.getLogger(__name__)


def instantiate_empty(
    ctx: LoadContext,
    *,
    path: str | None,
    builtin: str | None = None,
    model: dict | None = None,
    dtype: str = "auto",
) -> None:
    if not path and not builtin:
        raise UserError("checkpoint.path: no checkpoint given; set checkpoint.path=/path/to/model")
    path = os.path.abspath(os.path.expanduser(str(path))) if path else ensure_builtin(builtin)
    if not os.path.exists(path):
        raise UserError(
            f"checkpoint.path: {path} does not exist; point checkpoint.path at a model directory or .safetensors file"
        )
    skeleton = build_skeleton(path, model, ctx.quant.unquantized_dtype or dtype)  # the plan's dtype policy
    ctx.checkpoint_path = path
    ctx.model = skeleton.model
    ctx.model_config = skeleton.config
    ctx.tied_groups = skeleton.tied_groups
    ctx.no_split = skeleton.no_split
    ctx.keep_in_fp32 = skeleton.keep_in_fp32
    n_params = sum(p.numel() for p in skeleton.model.parameters())
    ctx.report["model"] = {
        "class": type(skeleton.model).__name__,
        "parameters": n_params,
        "tied_groups": ctx.tied_groups,
        "no_split_modules": ctx.no_split,
    }
    log.info(
        "skeleton %s: %d parameters on meta, %d tied groups",
        type(skeleton.model).__name__,
        n_params,
        len(ctx.tied_groups),
    )
