"""Model-class internals of transformers: auto-class mappings, building from a config, the class
attributes from_pretrained reads, the generation-config hook and the remote-code importer.

Checked on transformers 4.56.0, 5.24.0 and 5.25.0 (scripts/compat.sh) unless a function says more.
"""

from __future__ import annotations

import torch

from .version import unsupported


def auto_class_for(auto_cls, config) -> type | None:
    """The class `auto_cls.from_config(config)` would build; None when the auto class has none for it.
    `_BaseAutoModelClass._model_mapping` (a lazy mapping keyed by config class): unchanged 4.56 to 5.25."""
    mapping = getattr(auto_cls, "_model_mapping", None)
    if mapping is None:
        raise unsupported(f"{auto_cls.__name__}._model_mapping")
    # its .get would bypass the lazy __getitem__ that imports the class
    return mapping[type(config)] if type(config) in mapping else None  # noqa: SIM401


def is_concrete_model_class(obj) -> bool:
    """A PreTrainedModel subclass (not an auto class): it has `_from_config` (4.x and 5.x alike)."""
    return isinstance(obj, type) and hasattr(obj, "_from_config")


def is_model_class(obj) -> bool:
    """A model class or an auto class: something built from a config."""
    return isinstance(obj, type) and (hasattr(obj, "_from_config") or hasattr(obj, "from_config"))


def build_from_config(cls, config, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """A model class (or auto class) built from a config as from_pretrained builds it: `_from_config`
    sets the attention implementation and, given `dtype`, torch's default dtype (4.56 to 5.25).
    An auto class is told checkpoint.trust_remote_code: left unset, transformers asks on the terminal."""
    builder = getattr(cls, "_from_config", None) or cls.from_config
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if not hasattr(cls, "_from_config"):  # an auto class: it chooses between its class and the checkpoint's code
        kwargs["trust_remote_code"] = bool(trust_remote_code)
    return builder(config, **kwargs)


def keep_in_fp32_modules(module) -> list[str]:
    """`_keep_in_fp32_modules` and `_keep_in_fp32_modules_strict` (the strict list is new in 4.5x; 5.x
    gathers both from submodels in post_init, as sets)."""
    found = set(getattr(module, "_keep_in_fp32_modules", None) or [])
    found |= set(getattr(module, "_keep_in_fp32_modules_strict", None) or [])
    return sorted(found)


def no_split_modules(module) -> list[str]:
    """`_no_split_modules`: the block classes a device map must not cut (a list in 4.x, a set in 5.x)."""
    return sorted(getattr(module, "_no_split_modules", None) or [])


def base_model_prefix(model) -> str:
    """The attribute holding the base model (`model` for Llama); public on every release, '' for plain modules."""
    return getattr(model, "base_model_prefix", "") or ""


def adjust_generation(model, directory: str, trust_remote_code: bool) -> None:
    """`generation_config` set from `directory` exactly as from_pretrained sets it: its own
    `adjust_generation_fn` (same signature 4.56 to 5.25). ValueError: a field transformers rejects."""
    adjust = getattr(model, "adjust_generation_fn", None)
    if adjust is None:
        raise unsupported("PreTrainedModel.adjust_generation_fn")
    adjust(
        generation_config=None,  # none passed by a caller: read the directory
        from_auto_class=False,
        from_pipeline=None,
        pretrained_model_name_or_path=directory,
        cache_dir=None,
        force_download=False,
        proxies=None,
        local_files_only=True,
        token=None,
        revision="main",
        subfolder="",
        trust_remote_code=trust_remote_code,
    )


def remote_class(ref: str, directory: str) -> type:
    """`module.Class` imported from the checkpoint directory's own code, as trust_remote_code=True does
    (`dynamic_module_utils.get_class_from_dynamic_module`, 4.56 to 5.25). Only for a trusted checkpoint."""
    try:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
    except ImportError:
        raise unsupported("transformers.dynamic_module_utils.get_class_from_dynamic_module") from None
    return get_class_from_dynamic_module(ref, directory, local_files_only=True)


def initialised_when_missing(model) -> list[str]:
    """Regexes of tensors from_pretrained initialises itself when a checkpoint lacks them
    (`_keys_to_ignore_on_load_missing`, gathered from submodels in post_init since 5.0)."""
    return [p for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or () if p]


def initialise_missing(model, module, leaves: list[str]) -> bool:
    """The model's own `_init_weights` on `module`, touching only `leaves` (its other tensors are marked
    `_is_hf_initialized`, as from_pretrained marks loaded ones; 5.x). False: no such scheme (not transformers)."""
    init = getattr(model, "_init_weights", None)
    if init is None:
        return False
    tensors = [(k, v) for k, v in list(module._parameters.items()) + list(module._buffers.items()) if v is not None]
    for k, v in tensors:
        if k not in leaves:
            v._is_hf_initialized = True
    try:
        with torch.no_grad():
            init(module)
    finally:
        for _, v in tensors:
            if getattr(v, "_is_hf_initialized", False):
                del v._is_hf_initialized
    return True
