"""Stage 1: the model skeleton on the meta device, no weight memory allocated (loading/skeleton.py)."""

from __future__ import annotations

import logging

from ..checkpoint.builtin import ensure_builtin
from ..checkpoint.sources import resolve_checkpoint
from ..errors import UserError
from ..loading.skeleton import build_skeleton
from ..schema import CheckpointSchema, DtypeSchema
from .context import LoadContext

log = logging.getLogger(__name__)


def instantiate_empty(
    ctx: LoadContext,
    *,
    path: str | None,
    builtin: str | None = CheckpointSchema.builtin,
    revision: str | None = CheckpointSchema.revision,
    model: dict | None = CheckpointSchema.model,
    dtype: str = DtypeSchema.name,
    trust_remote_code: bool = CheckpointSchema.trust_remote_code,
) -> None:
    if path is not None and not str(path).strip():  # `checkpoint.path=$UNSET`: never the built-in model instead
        raise UserError(
            f"checkpoint.path: empty ({str(path)!r}, an unset shell variable?); set checkpoint.path=/path/to/model, "
            f"or leave the key out for the built-in model"
        )
    if not path and not builtin:
        raise UserError("checkpoint.path: no checkpoint given; set checkpoint.path=/path/to/model")
    path = resolve_checkpoint(str(path), revision) if path else ensure_builtin(builtin)
    skeleton = build_skeleton(  # under the plan's dtype policy
        path, model, ctx.quant.unquantized_dtype or dtype, trust_remote_code=bool(trust_remote_code)
    )
    ctx.checkpoint_path = path
    ctx.model = skeleton.model
    ctx.model_config = skeleton.config
    ctx.tied_groups = skeleton.tied_groups
    ctx.no_split = skeleton.no_split
    ctx.keep_in_fp32 = skeleton.keep_in_fp32
    ctx.floating = _floating(skeleton.model)
    n_params = sum(p.numel() for p in skeleton.model.parameters())
    ctx.report["model"] = {
        "class": type(skeleton.model).__name__,
        "parameters": n_params,
        "tied_groups": ctx.tied_groups,
        "no_split_modules": ctx.no_split,
    }
    if trust_remote_code:
        ctx.report["model"]["class_module"] = type(skeleton.model).__module__  # whose code was trusted
    log.info(
        "skeleton %s: %d parameters on meta, %d tied groups",
        type(skeleton.model).__name__,
        n_params,
        len(ctx.tied_groups),
    )


def _floating(model) -> frozenset[str]:
    """What the model itself holds as floating point: validate's second look at a tensor's dtype."""
    named = (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
    return frozenset(n for n, t in named if t.is_floating_point())
