"""Optional stage: write the loaded (quantized) model as a new safetensors checkpoint.

int8 layers are saved as their int8 weight plus its fp32 row scales (`<module>.SCB`),
with metadata saying how they were made. Loading that directory skips quantization
and gives the same tensors bit for bit. The source checkpoint is never written to:
the destination must lie outside it, and is written to a temporary directory that is
renamed into place only when complete.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from ..checkpoint.writer import write_checkpoint_dir
from ..errors import UserError
from ..quant.prequantized import METADATA_KEY
from .context import LoadContext

log = logging.getLogger(__name__)

COPIED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


def save(ctx: LoadContext, *, path: str | None = None, max_shard_mib: int = 2048, overwrite: bool = False) -> None:
    ctx.require("loaded", "save", "load_shards")
    dest = _destination(ctx, path, overwrite)
    if ctx.quant.is_four_bit:
        raise UserError(
            f"stages.save: saving {ctx.quant.method} models is not supported yet; "
            f"save with quantization=int8 or quantization=none"
        )
    tensors = _tensors_to_save(ctx)
    info = {
        "quantization": {
            "method": ctx.quant.method,
            "threshold": ctx.quant.threshold if ctx.quant.is_int8 else None,
            "modules": list(ctx.plan.quantized_modules),
            "thresholds": dict(ctx.plan.int8_thresholds),
        },
        "source": ctx.checkpoint.path,
        "dtype": ctx.dtype_policy.name,
    }
    files = write_checkpoint_dir(
        dest,
        tensors,
        metadata={METADATA_KEY: json.dumps(info, sort_keys=True)},
        max_shard_bytes=max_shard_mib * 2**20,
        copy_from=ctx.checkpoint.directory,
        copied=COPIED,
    )
    ctx.report["save"] = {
        "path": dest,
        "tensors": len(tensors),
        "files": files,
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }
    log.info("saved %d tensors to %s", len(tensors), dest)


def _destination(ctx: LoadContext, path: str | None, overwrite: bool) -> str:
    """A new directory outside the source checkpoint (or an existing one with overwrite=true)."""
    if not path:
        raise UserError("stages.save.path: where to write the saved checkpoint; set stages.save.path=/some/new/dir")
    dest = os.path.abspath(os.path.expanduser(str(path)))
    source = os.path.realpath(ctx.checkpoint.directory)
    if os.path.commonpath([os.path.realpath(dest), source]) == source:
        raise UserError(
            f"stages.save.path: {dest} is inside the source checkpoint {source}; loading never writes there"
        )
    if os.path.exists(dest) and os.listdir(dest) and not overwrite:
        raise UserError(
            f"stages.save.path: {dest} exists and is not empty; choose a new directory or set stages.save.overwrite=true"
        )
    return dest


def _tensors_to_save(ctx: LoadContext) -> dict[str, torch.Tensor]:
    """Model tensors by their checkpoint names (tied copies once), int8 scales beside their weights."""
    out: dict[str, torch.Tensor] = {}
    named = dict(ctx.model.named_parameters(remove_duplicate=False))
    named.update(dict(ctx.model.named_buffers(remove_duplicate=False)))
    modules = dict(ctx.model.named_modules())
    for name, t in ctx.plan.tensors.items():
        if t.tied_to or (t.kind == "buffer" and t.source is None):
            continue  # tied copies and buffers the model makes itself are not checkpoint tensors
        value = named[name]
        if value.device.type == "meta" and ctx.offload is not None:
            value = ctx.offload[name]
        if value.device.type == "meta":
            raise UserError(f"stages.save: {name} was never loaded (missing from the source); nothing to save for it")
        key = name if t.conversion is not None else t.source or name  # a fused tensor under its model name
        out[key] = value.detach().to("cpu").contiguous()
        if t.quantized:
            module = modules[name.rpartition(".")[0]]
            scb = value.SCB if getattr(value, "SCB", None) is not None else module.state.SCB
            out[f"{name.rpartition('.')[0]}.SCB"] = scb.detach().to("cpu").contiguous()
    return out
