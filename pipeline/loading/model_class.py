"""Which model class a checkpoint is built as: the one `from_pretrained` users get, or exit 2 saying why not.

From config.json alone, before anything is built or imported; the checkpoint's own code only with
`checkpoint.trust_remote_code=true`, never a silent fallback to another class (the rules: docs/design.md,
"Which model class").
"""

from __future__ import annotations

import json
import logging
import os

from ..checkpoint.header import read_header
from ..checkpoint.layout import INDEX_NAME, SINGLE_NAME
from ..errors import UserError
from ..hf.modeling import auto_class_for, base_model_prefix, is_concrete_model_class, remote_class

log = logging.getLogger(__name__)

TRUST_KEY = "checkpoint.trust_remote_code"
# auto classes tried, in order, for an auto_map entry when config.json names no architecture
_AUTO_ORDER = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModel")


def model_class(config, path: str, trust_remote_code: bool = False) -> type:
    """The class to build for `config` (read from `path`'s config.json)."""
    import transformers

    archs = list(getattr(config, "architectures", None) or [])
    auto_map = _model_auto_map(config)
    for arch in archs:
        entry = next(((k, v) for k, v in auto_map.items() if v.rpartition(".")[2] == arch), None)
        if entry is not None and trust_remote_code:
            return _remote_class(entry, path)
        cls = _transformers_class(arch)
        if cls is not None:
            if entry is not None:
                log.warning(
                    "config.json auto_map %s: %s is the checkpoint's own code; using transformers' %s "
                    "(set %s=true to use the checkpoint's code)",
                    *entry,
                    arch,
                    TRUST_KEY,
                )
            return cls
        if entry is not None:
            raise UserError(
                f"{config_file(path)}: architectures names {arch}, which only the checkpoint's own code defines "
                f"(auto_map {entry[0]}: {entry[1]}); nothing from the checkpoint is imported unless you trust it: "
                f"set {TRUST_KEY}=true"
            )
    if archs and auto_map:  # auto_map names the checkpoint's classes under other names than architectures
        return _trusted_auto_map(auto_map, path, trust_remote_code, f"architectures names {', '.join(archs)}")
    if archs:
        raise UserError(
            f"{config_file(path)}: architectures names {', '.join(archs)}: no such class in transformers "
            f"{transformers.__version__} and no auto_map; upgrade transformers, fix architectures, "
            "or set checkpoint.model={_target_: <a model class>}"
        )
    return _without_architectures(config, path, auto_map, trust_remote_code)


def _without_architectures(config, path: str, auto_map: dict, trust_remote_code: bool) -> type:
    """No `architectures` in config.json: the class a `from_pretrained` user would pick for this checkpoint, the
    generating head, or AutoModel when the tensor names say a bare base model (docs/design.md, "Which model
    class"); names under the base-model prefix with no generating head: exit 2."""
    import transformers

    if auto_map:
        return _trusted_auto_map(auto_map, path, trust_remote_code, "no architectures")
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    heads = (
        (transformers.AutoModelForSeq2SeqLM, transformers.AutoModelForSpeechSeq2Seq)
        if encoder_decoder
        else (transformers.AutoModelForCausalLM,)
    )
    head = next((h for h in heads if auto_class_for(h, config) is not None), heads[0])
    base = transformers.AutoModel
    chosen, names = base, _tensor_names(path)
    head_cls = auto_class_for(head, config)
    if head_cls is not None:
        prefix = base_model_prefix(head_cls) + "."
        if encoder_decoder or names is None or any(n.startswith(prefix) for n in names):
            chosen = head
    cls = auto_class_for(chosen, config)
    if cls is None:
        raise UserError(
            f"{config_file(path)}: no architectures and model_type {config.model_type!r} has no model class; "
            "add architectures to config.json or set checkpoint.model={_target_: <a model class>}"
        )
    prefix = base_model_prefix(cls)
    if chosen is base and prefix and names and any(n.startswith(prefix + ".") for n in names):
        raise UserError(
            f"{config_file(path)}: no architectures, and the tensor names ({prefix}.*) come from a model with a "
            "task head; add architectures (the class it was saved from) to config.json "
            "or set checkpoint.model={_target_: <that class>}"
        )
    log.info("config.json names no architectures: building %s (as %s.from_pretrained)", cls.__name__, chosen.__name__)
    return cls


def _trusted_auto_map(auto_map: dict, path: str, trust_remote_code: bool, why: str) -> type:
    """The checkpoint's own class from auto_map (CausalLM first, as a generating user would pick), if trusted."""
    key = next((k for k in _AUTO_ORDER if k in auto_map), next(iter(auto_map)))
    if trust_remote_code:
        return _remote_class((key, auto_map[key]), path)
    raise UserError(
        f"{config_file(path)}: {why}; auto_map {key}: {auto_map[key]} is the checkpoint's own code, "
        f"imported only when you trust it: set {TRUST_KEY}=true"
    )


def _transformers_class(name: str) -> type | None:
    import transformers

    try:
        cls = getattr(transformers, name, None)
    except (ImportError, RuntimeError):  # a class whose optional backend is missing
        return None
    return cls if is_concrete_model_class(cls) else None


def _remote_class(entry: tuple[str, str], path: str) -> type:
    """The checkpoint's own class, imported by transformers from the local directory (the user trusted it)."""
    key, ref = entry
    if "--" in ref:
        raise UserError(
            f"{config_file(path)}: auto_map {key}: {ref} points at code in another repository; "
            "copy that code into the checkpoint directory and name it module.Class"
        )
    try:
        return remote_class(ref, _directory(path))
    except (OSError, ImportError, AttributeError, SyntaxError) as exc:
        raise UserError(
            f"{config_file(path)}: auto_map {key}: {ref} cannot be imported from the checkpoint directory "
            f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]}); add the module file or fix auto_map"
        ) from None


def check_remote_config(path: str, trust_remote_code: bool) -> None:
    """A config class only the checkpoint's code defines (auto_map AutoConfig) is imported only when trusted."""
    from transformers import CONFIG_MAPPING

    with open(config_file(path)) as fh:
        raw = json.load(fh)
    ref = (raw.get("auto_map") or {}).get("AutoConfig")
    if ref and not trust_remote_code and raw.get("model_type") not in CONFIG_MAPPING:
        raise UserError(
            f"{config_file(path)}: model_type {raw.get('model_type')!r} is defined by the checkpoint's own code "
            f"(auto_map AutoConfig: {ref}); nothing from the checkpoint is imported unless you trust it: "
            f"set {TRUST_KEY}=true"
        )


def _model_auto_map(config) -> dict[str, str]:
    """auto_map entries for model classes (AutoConfig and tokenizer entries are not model classes)."""
    auto_map = getattr(config, "auto_map", None) or {}
    return {k: v for k, v in auto_map.items() if k.startswith("AutoModel") and isinstance(v, str)}


def _tensor_names(path: str) -> list[str] | None:
    """Tensor names from the index or the single safetensors header (no bytes); None when neither is there."""
    root = _directory(path)
    index = os.path.join(root, INDEX_NAME)
    try:
        if os.path.isfile(index):
            with open(index) as fh:
                return list(json.load(fh).get("weight_map", {}))
        single = path if path.endswith(".safetensors") else os.path.join(root, SINGLE_NAME)
        if os.path.isfile(single):
            return list(read_header(single)[0])
    except (OSError, ValueError, UserError):
        return None  # the plan stage names what is wrong with the files
    return None


def _directory(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(path)


def config_file(path: str) -> str:
    return os.path.join(_directory(path), "config.json")
