"""Optional stage: write the loaded (quantized) model as a new checkpoint that transformers reads back.

Quantized layers are written by bitsandbytes' own serializer in transformers' key layout, and config.json
gains the `quantization_config` transformers writes (a plan with several methods: our own, which transformers
refuses), so from_pretrained and this pipeline load the directory as saved, bit for bit (docs/design.md,
"Pre-quantized checkpoints and what save writes"). Save never destroys what it did not write: the destination
lies apart from the checkpoint and the run directory, only an earlier save of ours is replaced (with
overwrite=true), and the new one is swapped in by renames (docs/design.md, "Save never destroys what it did
not write").
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import replace

import torch

from ..cache_home import cache_dir
from ..checkpoint.homes import checkpoint_homes, real, relation
from ..checkpoint.save_mark import MARK, foreign_entry, read_mark
from ..checkpoint.swap import recover
from ..checkpoint.writer import write_checkpoint_dir
from ..dtypes import dtype_name
from ..errors import UserError
from ..quant.formats.hf_config import bnb_quantization_config, unconverted_modules
from ..quant.formats.mixed_plan import mixed_quantization_config
from ..quant.formats.ours import METADATA_KEY
from .context import LoadContext
from .traits import stage

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


def _precheck(cfg, run_dir, keys: dict) -> None:
    """The save's destination, checked before any stage runs (nothing loaded yet; a killed save's leftovers cleaned)."""
    source = cfg.checkpoint.get("path") or ""
    if not source and cfg.checkpoint.get("builtin"):
        source = os.path.join(cache_dir(), str(cfg.checkpoint.builtin))
    homes = checkpoint_homes(str(source)) if source else []
    _checked_destination(keys.get("path"), bool(keys.get("overwrite", False)), homes, str(run_dir))


@stage(precheck=_precheck)
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
    modules = _saved_modules(ctx)
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
        config["quantization_config"] = _quantization_config(ctx)
    return config


def _quantization_config(ctx: LoadContext) -> dict:
    """transformers' own BitsAndBytesConfig when one method covers every quantized module (kept ones listed as
    skipped), so transformers reads it; else our mixed-plan format (quant/formats/mixed_plan.py), which it refuses."""
    skip = unconverted_modules(ctx.model, ctx.plan.quantized_modules)
    modules = _saved_modules(ctx)
    methods = {modules[m]: ctx.plan.tensors[f"{m}.weight"].quantized for m in ctx.plan.quantized_modules}
    used = set(methods.values())
    if len(used) > 1:
        thresholds = {modules[m]: t for m, t in ctx.plan.int8_thresholds.items()}
        return mixed_quantization_config(ctx.quant, methods, thresholds, skip)
    one = replace(ctx.quant, method=used.pop(), methods=()) if used else ctx.quant
    return bnb_quantization_config(one, skip)


def _saved_modules(ctx: LoadContext) -> dict[str, str]:
    """Quantized module (model name) -> the module name its tensors are saved under (_saved_key's)."""
    return {
        n: _saved_key(f"{n}.weight", ctx.plan.tensors[f"{n}.weight"]).rpartition(".")[0]
        for n in ctx.plan.quantized_modules
    }


def _saved_key(name: str, t) -> str:
    """A tensor's key in the save: its checkpoint name, or its model name when transformers converts it."""
    return name if t.conversion is not None else t.source or name


def _destination(ctx: LoadContext, path: str | None, overwrite: bool) -> str:
    """The real path to save to, checked again now that the checkpoint is open (its files' real homes)."""
    homes = checkpoint_homes(ctx.checkpoint.path) + [os.path.dirname(real(f)) for f in ctx.checkpoint.files]
    return _checked_destination(path, overwrite, list(dict.fromkeys(homes)), str(ctx.run_dir))


def _checked_destination(path, overwrite: bool, homes: list[str], run_dir: str) -> str:
    """A directory apart from the checkpoint and the run directory, holding nothing, or (overwrite=true) an
    earlier save of ours; a killed save's leftovers beside it are cleaned up first."""
    if not path:
        raise UserError("stages.save.path: where to write the saved checkpoint; set stages.save.path=/some/new/dir")
    dest = real(str(path))
    _check_apart(dest, homes, real(run_dir))
    for note in recover(dest):
        log.warning("stages.save.path: %s", note)
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise UserError(f"stages.save.path: {dest} is a file, not a directory; choose a directory path")
    if os.path.isdir(dest) and os.listdir(dest):
        _check_replaceable(dest, overwrite)
    return dest


def _check_apart(dest: str, homes: list[str], run_dir: str) -> None:
    """Not the checkpoint, nor inside it, nor holding it (an overwrite would remove it); likewise the run directory."""
    for home in homes:
        rel = relation(dest, home)
        if rel == "inside":
            raise UserError(
                f"stages.save.path: {dest} is inside the source checkpoint {home} (where its files are); "
                "loading never writes there; choose a directory outside it"
            )
        if rel is not None:
            what = "is the source checkpoint directory" if rel == "is" else f"contains the source checkpoint {home}"
            raise UserError(
                f"stages.save.path: {dest} {what}; a save never replaces it; choose a directory apart from it"
            )
    rel = relation(dest, run_dir)
    if rel is not None:
        where = {"is": "is", "inside": "is inside", "contains": "contains"}[rel]
        raise UserError(
            f"stages.save.path: {dest} {where} the run directory {run_dir}; choose a directory apart from it"
        )


def _check_replaceable(dest: str, overwrite: bool) -> None:
    """A non-empty destination is replaced only when it is an earlier save of ours, unchanged, and asked for."""
    mark = read_mark(dest)
    if mark is None or mark.get("state") != "complete":
        raise UserError(
            f"stages.save.path: {dest} exists and is not empty, and was not written by a save (no {MARK} in it), "
            "so it is never replaced; choose a new directory"
        )
    foreign = foreign_entry(dest, mark)
    if foreign:
        raise UserError(
            f"stages.save.path: {dest} exists and is not empty, and holds {foreign}, so it is never replaced; "
            "choose a new directory, or move that file out"
        )
    if not overwrite:
        raise UserError(
            f"stages.save.path: {dest} exists and is not empty (an earlier save); "
            "set stages.save.overwrite=true to replace it, or choose a new directory"
        )


def _tensors_to_save(ctx: LoadContext) -> dict[str, torch.Tensor]:
    """Model tensors by their checkpoint names (tied copies once); quantized layers as bitsandbytes writes them."""
    out: dict[str, torch.Tensor] = {}
    named = dict(ctx.model.named_parameters(remove_duplicate=False))
    named.update(dict(ctx.model.named_buffers(remove_duplicate=False)))
    for name, t in ctx.plan.tensors.items():
        if t.tied_to or (t.kind == "buffer" and t.source is None):
            continue  # tied copies and buffers the model makes itself are not checkpoint tensors
        key = _saved_key(name, t)  # a fused tensor under its model name
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
