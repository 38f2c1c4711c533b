"""The model skeleton on the meta device (no weight memory), and what the planner needs from it.

Built as from_pretrained builds it: the class config.json names (loading/model_class.py;
or a model `_target_`), from the config, with the checkpoint's generation config
(loading/generation.py). Also records tied parameter groups (loaded once, kept on one device),
no-split module classes (never cut across devices) and modules transformers keeps in fp32.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..dtypes import policy_dtype
from ..errors import UserError
from ..hf.modeling import build_from_config, is_model_class, keep_in_fp32_modules, no_split_modules
from .config_values import CONFIG_ERRORS, check_config_values, config_error
from .generation import apply_generation_config
from .model_class import check_remote_config, config_file, model_class


@dataclass(frozen=True)
class Skeleton:
    model: torch.nn.Module
    config: object | None  # the transformers config, when there is one
    tied_groups: list[list[str]] = field(default_factory=list)
    no_split: list[str] = field(default_factory=list)
    keep_in_fp32: list[str] = field(default_factory=list)


def build_skeleton(path: str, node: dict | None, dtype: str = "auto", trust_remote_code: bool = False) -> Skeleton:
    """The empty model for checkpoint `path`; `node` is an allow-listed `_target_` node or None.

    Built under torch's default dtype set to the load dtype (`dtype`, a policy name; "auto":
    config.json's), as from_pretrained builds it: buffers the model makes itself (Gemma's
    embed_scale...) then have the dtype and bits they have there. Code from the checkpoint
    directory (config.json `auto_map`) is imported only when `trust_remote_code`; otherwise
    such a checkpoint is a UserError before anything is built.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import find_tied_parameters
    from hydra.utils import get_object

    target = get_object(node["_target_"]) if node is not None else None
    config = read_config(path, trust_remote_code) if target is None or is_model_class(target) else None
    cls = model_class(config, path, trust_remote_code) if node is None else None
    load_dtype = _load_dtype(dtype, config)
    with init_empty_weights(include_buffers=False), default_dtype(load_dtype):
        module = (
            _build_class(cls, config, load_dtype)
            if cls is not None
            else _build(target, node, config, load_dtype, trust_remote_code)
        )
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"checkpoint.model: {node['_target_']} built a {type(module).__name__}, not a torch.nn.Module")
    if hasattr(module, "tie_weights"):
        module.tie_weights()  # transformers 5 ties only when asked; the groups are what we need
    module.eval()
    if config is not None:
        apply_generation_config(module, os.path.dirname(config_file(path)), trust_remote_code)
    return Skeleton(
        model=module,
        config=config,
        tied_groups=[sorted(g) for g in find_tied_parameters(module)],
        no_split=no_split_modules(module),
        keep_in_fp32=keep_in_fp32_modules(module),
    )


@contextmanager
def default_dtype(dtype: torch.dtype | None):
    """torch's default dtype set to `dtype` (when floating) while the block runs, restored after."""
    old = torch.get_default_dtype()
    if dtype is not None and dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _load_dtype(name: str, config) -> torch.dtype | None:
    if str(name).lower() != "auto":
        return policy_dtype(name, "dtype")
    found = getattr(config, "dtype", None) if config is not None else None
    return found if isinstance(found, torch.dtype) else None


def read_config(path: str, trust_remote_code: bool = False):
    """config.json beside the weights, read by transformers; UserError naming the file when it cannot be."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    cfg_file = config_file(path)
    if not os.path.isfile(cfg_file):
        raise UserError(f"{path}: no config.json; add it or set checkpoint.model to a model _target_")
    try:
        with open(cfg_file) as fh:
            doc = json.load(fh)
    except json.JSONDecodeError:
        raise UserError(f"{cfg_file}: not valid JSON; fix or re-save the config") from None
    check_config_values(doc, cfg_file)
    try:
        check_remote_config(path, trust_remote_code)
        return AutoConfig.from_pretrained(
            os.path.dirname(cfg_file), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (ValueError, KeyError) as exc:
        raise UserError(
            f"{cfg_file}: transformers cannot read it ({str(exc).splitlines()[0][:120]}); check model_type"
        ) from None
    except (StrictDataclassError, *CONFIG_ERRORS) as exc:
        raise config_error(exc, doc, cfg_file, "reading the config") from None


def _build_class(cls, config, dtype: torch.dtype | None = None):
    """The chosen class from config.json; the checkpoint's own (trusted) code failing is the user's to fix."""
    if not cls.__module__.startswith("transformers_modules."):
        return _from_config_values(cls, config, dtype)
    try:
        return build_from_config(cls, config, dtype)
    except Exception as exc:  # code from the checkpoint directory: any error is in that code
        raise UserError(
            f"checkpoint.trust_remote_code: the checkpoint's {cls.__module__}.{cls.__name__} failed to build "
            f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]}); fix the checkpoint's code"
        ) from None


def _build(obj, node: dict, config, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """A model class built from config.json (node keys override it), or any allow-listed factory."""
    if is_model_class(obj):
        for key, value in node.items():  # extra keys override config.json fields
            if not key.startswith("_"):
                setattr(config, key, value)
        return _from_config_values(obj, config, dtype, trust_remote_code)
    from hydra.utils import instantiate

    try:
        return instantiate(node, _convert_="all")
    except Exception as exc:
        raise UserError(
            f"checkpoint.model: {node.get('_target_')} failed to build "
            f"({_one_line(exc.__cause__ or exc)}); "
            "check its keys"
        ) from None


def _from_config_values(cls, config, dtype, trust_remote_code: bool = False):
    """transformers' class built from config.json; what it refuses in the config's values is the user's to fix."""
    try:
        return build_from_config(cls, config, dtype, trust_remote_code)
    except CONFIG_ERRORS as exc:
        name = getattr(config, "_name_or_path", "") or ""
        cfg_file = os.path.join(name, "config.json") if name else "config.json"
        raise config_error(exc, config.to_dict(), cfg_file, f"building {cls.__name__}") from None


def _one_line(exc: BaseException) -> str:
    """An exception as one line (Hydra's InstantiationException spans lines; its cause says what failed)."""
    return f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:200]}"
