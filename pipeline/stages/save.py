"""Optional stage: write the loaded (quantized) model as a new checkpoint that transformers reads back.

Quantized layers are written by bitsandbytes' own serializer in transformers' key layout
(int8: `<module>.weight` + `.SCB` + `.weight_format`; 4-bit: the packed `weight` and its
`weight.absmax`, `.quant_map`, `.nested_*`, `.quant_state.bitsandbytes__nf4|fp4`), and
config.json gains the `quantization_config` transformers writes (quant/formats/hf_config.py)
and the dtype the unquantized tensors were saved in. So transformers' from_pretrained and
this pipeline both load the directory as saved, bit for bit. Per-module thresholds, which
transformers has no field for, are kept in our safetensors metadata.

The source checkpoint is never written to: the destination must lie outside it, and is
written to a temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter

import torch

from ..checkpoint.writer import write_checkpoint_dir
from ..dtypes import dtype_name
from ..errors import UserError
from ..quant.formats.hf_config import bnb_quantization_config, unconverted_modules
from ..quant.formats.ours import METADATA_KEY
from .context import LoadContext

log = logging.getLogger(__name__)

COPIED = (
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
    tensors = _tensors_to_save(ctx)
    files = write_checkpoint_dir(
        dest,
        tensors,
        metadata={METADATA_KEY: json.dumps(_our_metadata(ctx), sort_keys=True)},
        max_shard_bytes=max_shard_mib * 2**20,
        copy_from=ctx.checkpoint.directory,
        copied=COPIED,
        json_files={"config.json": _config_json(ctx)},
    )
    ctx.report["save"] = {
        "path": dest,
        "tensors": len(tensors),
        "files": files,
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }
    log.info("saved %d tensors to %s", len(tensors), dest)


def _our_metadata(ctx: LoadContext) -> dict:
    """How the checkpoint was made, with per-module thresholds under their checkpoint module names."""
    modules = {
        n: (ctx.plan.tensors[f"{n}.weight"].source or f"{n}.weight").rpartition(".")[0]
        for n in ctx.plan.quantized_modules
    }
    return {
        "quantization": {
            "method": ctx.quant.method,
            "threshold": ctx.quant.threshold if ctx.quant.is_int8 else None,
            "modules": sorted(modules.values()),
            "thresholds": {modules[m]: t for m, t in ctx.plan.int8_thresholds.items()},
        },
        "source": ctx.checkpoint.path,
        "dtype": ctx.dtype_policy.name,
    }


def _config_json(ctx: LoadContext) -> dict:
    """The source config.json with the saved dtype and, for a quantized model, transformers' quantization_config."""
    src = os.path.join(ctx.checkpoint.directory, "config.json")
    if os.path.isfile(src):
        with open(src) as fh:
            config = json.load(fh)
    elif ctx.model_config is not None and hasattr(ctx.model_config, "to_dict"):
        config = ctx.model_config.to_dict()
    else:
        config = {}
    floats = Counter(
        t.dtype for t in ctx.plan.tensors.values() if t.source and not t.quantized and t.dtype.is_floating_point
    )
    if floats:  # transformers' dtype="auto" loads the unquantized tensors in this dtype
        name = dtype_name(floats.most_common(1)[0][0])
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    config.pop("quantization_config", None)
    if ctx.quant.enabled:
        skip = unconverted_modules(ctx.model, ctx.plan.quantized_modules)
        config["quantization_config"] = bnb_quantization_config(ctx.quant, skip)
    return config


def _destination(ctx: LoadContext, path: str | None, overwrite: bool) -> str:
    """A new directory outside the source checkpoint (or an existing one with overwrite=true)."""
    if not path:
        raise UserError("stages.save.path: where to write the saved checkpoint; set stages.save.path=/some/new/dir")
    dest = os.path.abspath(os.path.expanduser(str(path)))
    _check_outside_source(ctx, dest)
    if os.path.exists(dest) and os.listdir(dest) and not overwrite:
        raise UserError(
            f"stages.save.path: {dest} exists and is not empty; choose a new directory or set stages.save.overwrite=true"
        )
    return dest


def _check_outside_source(ctx: LoadContext, dest: str) -> None:
    """Never into the checkpoint, nor where its symlinks lead (a hub cache's blobs): a shard saved over its own target."""
    real = os.path.realpath(dest)
    homes = [ctx.checkpoint.directory] + [os.path.dirname(os.path.realpath(f)) for f in ctx.checkpoint.files]
    for home in dict.fromkeys(os.path.realpath(h) for h in homes):
        if os.path.commonpath([real, home]) == home:
            raise UserError(
                f"stages.save.path: {dest} is inside the source checkpoint {home} (where its files are); "
                "loading never writes there; choose a directory outside it"
            )


def _tensors_to_save(ctx: LoadContext) -> dict[str, torch.Tensor]:
    """Model tensors by their checkpoint names (tied copies once); quantized layers as bitsandbytes writes them."""
    out: dict[str, torch.Tensor] = {}
    named = dict(ctx.model.named_parameters(remove_duplicate=False))
    named.update(dict(ctx.model.named_buffers(remove_duplicate=False)))
    for name, t in ctx.plan.tensors.items():
        if t.tied_to or (t.kind == "buffer" and t.source is None):
            continue  # tied copies and buffers the model makes itself are not checkpoint tensors
        key = name if t.conversion is not None else t.source or name  # a fused tensor under its model name
        if t.quantized:
            out.update(_quantized_layer(ctx.model.get_submodule(name.rpartition(".")[0]), key.rpartition(".")[0]))
            continue
        value = named[name]
        if value.device.type == "meta" and ctx.offload is not None:
            value = ctx.offload[name]
        if value.device.type == "meta":
            raise UserError(f"stages.save: {name} was never loaded (missing from the source); nothing to save for it")
        out[key] = value.detach().to("cpu").contiguous()
    return out


def _quantized_layer(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The weight and its stats from the bitsandbytes module's own state_dict (its bias is a plan tensor)."""
    state = module.state_dict()
    return {f"{prefix}.{k}": v.detach().to("cpu").contiguous() for k, v in state.items() if k != "bias"}
