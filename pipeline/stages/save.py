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
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from ..context import LoadContext
from ..errors import UserError
from ..prequantized import METADATA_KEY

log = logging.getLogger(__name__)

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


def save(ctx: LoadContext, *, path: str | None = None, max_shard_mib: int = 2048, overwrite: bool = False) -> None:
    ctx.require("loaded", "save", "load_shards")
    if not path:
        raise UserError("stages.save.path: where to write the saved checkpoint; set stages.save.path=/some/new/dir")
    dest = os.path.abspath(os.path.expanduser(str(path)))
    source = os.path.realpath(ctx.checkpoint.directory)
    if os.path.commonpath([os.path.realpath(dest), source]) == source:
        raise UserError(f"stages.save.path: {dest} is inside the source checkpoint {source}; loading never writes there")
    if os.path.exists(dest) and os.listdir(dest) and not overwrite:
        raise UserError(f"stages.save.path: {dest} exists and is not empty; choose a new directory or set stages.save.overwrite=true")
    if ctx.quantization.get("method") in ("nf4", "fp4"):
        raise UserError(f"stages.save: saving {ctx.quantization['method']} models is not supported yet; "
                        f"save with quantization=int8 or quantization=none")
    tensors = _tensors_to_save(ctx)
    plan = ctx.plan
    info = {"quantization": {"method": ctx.quantization.get("method", "none"),
                             "threshold": ctx.quantization.get("threshold"),
                             "modules": list(plan.quantized_modules), "thresholds": dict(plan.int8_thresholds)},
            "source": ctx.checkpoint.path, "dtype": ctx.dtype_policy[0]}
    parent = os.path.dirname(dest) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".save-", dir=parent)
    try:
        weight_map = _write_shards(tmp, tensors, max_shard_mib * 2**20, {METADATA_KEY: json.dumps(info, sort_keys=True)})
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                       "weight_map": weight_map}, fh, indent=2, sort_keys=True)
        for name in COPIED:
            src = os.path.join(ctx.checkpoint.directory, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(tmp, name))
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ctx.report["save"] = {"path": dest, "tensors": len(tensors), "files": len(set(weight_map.values())),
                          "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    log.info("saved %d tensors to %s", len(tensors), dest)


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
        key = t.source or name
        out[key] = value.detach().to("cpu").contiguous()
        if t.quantized:
            module = modules[name.rpartition(".")[0]]
            scb = value.SCB if getattr(value, "SCB", None) is not None else module.state.SCB
            out[f"{name.rpartition('.')[0]}.SCB"] = scb.detach().to("cpu").contiguous()
    return out


def _write_shards(folder: str, tensors: dict, max_bytes: int, metadata: dict) -> dict[str, str]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, os.path.join(folder, fname), metadata={"format": "pt", **metadata})
        weight_map.update({n: fname for n in names})
    return weight_map
