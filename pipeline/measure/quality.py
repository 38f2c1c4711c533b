"""Quality measurements on a loaded model: forward on fixed inputs, perplexity, greedy text."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from importlib import resources

import torch

from ..quant.cpu_numerics import portable_numerics
from .inputs import Inputs, build_inputs, submodule_of


def input_device(model) -> torch.device:
    """Where inputs go: the input module's execution device (accelerate's hook knows it when offloaded)."""
    emb = _input_embeddings(model)
    if emb is not None:
        for module in emb.modules():
            dev = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
            if dev is not None:
                return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
        placed = next((p.device for p in emb.parameters() if p.device.type != "meta"), None)
        if placed is not None:
            return placed
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def _input_embeddings(model):
    """The module the main input enters: token embeddings, or a vision model's patch embeddings."""
    return submodule_of(model, "get_input_embeddings")


def fixed_inputs(model) -> Inputs:
    """The same inputs for every run, built from the model's main_input_name and config (measure/inputs.py)."""
    return build_inputs(model, input_device(model))


def measuring(model, portable: bool):
    """The numerics a measurement runs under: portable_numerics(model) when validate measures portably (int8 on the
    CPU, quantization.cpu_numerics=portable), else the model's own kernels. Entered per measurement, never left on
    the model (quant/cpu_numerics.py)."""
    return portable_numerics(model) if portable else contextlib.nullcontext(model)


def forward_output(model, inputs: dict) -> tuple[torch.Tensor, float]:
    """(the main output: logits, else last_hidden_state; seconds the forward took)."""
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(**inputs)
    seconds = time.perf_counter() - start
    main = getattr(out, "logits", None)
    if main is None:
        main = getattr(out, "last_hidden_state", None)
    if main is None:
        main = out[0] if isinstance(out, (tuple, list)) else out
    return main.float().cpu(), seconds


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm().clamp_min(1e-12))


def mean_cosine(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(0, -2), ref.flatten(0, -2), dim=-1).mean())


def is_causal_lm(model) -> bool:
    config = getattr(model, "config", None)
    return (
        hasattr(model, "generate")
        and config is not None
        and not getattr(config, "is_encoder_decoder", False)
        and model.get_output_embeddings() is not None
    )


def has_tokenizer(root: str) -> bool:
    """Whether the checkpoint ships a tokenizer (checked without importing the tokenizer code)."""
    return any(os.path.exists(os.path.join(root, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def tokenizer_code(root: str) -> str:
    """The checkpoint's own tokenizer code its files name (`auto_map` AutoTokenizer in tokenizer_config.json or
    config.json), as 'file: auto_map AutoTokenizer: entries'; '' when none. Reads JSON, imports nothing."""
    for name in ("tokenizer_config.json", "config.json"):
        path = os.path.join(root, name)
        try:
            with open(path) as fh:
                auto_map = json.load(fh).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue
        entry = auto_map if isinstance(auto_map, (list, tuple)) else None  # the legacy format: [slow, fast]
        if isinstance(auto_map, dict):
            entry = auto_map.get("AutoTokenizer")
        refs = [r for r in (entry if isinstance(entry, (list, tuple)) else [entry]) if isinstance(r, str)]
        if refs:
            return f"{path}: auto_map AutoTokenizer: {', '.join(refs)}"
    return ""


def load_tokenizer(root: str, trust_remote_code: bool = False):
    """The checkpoint's own tokenizer, or None when it ships none. transformers is always told
    checkpoint.trust_remote_code: left unset, it would ask on the terminal whether to run the checkpoint's code."""
    if not has_tokenizer(root):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(root, local_files_only=True, trust_remote_code=bool(trust_remote_code))


def eval_text(path: str | None, shipped: str = "eval.txt") -> str:
    """A text to measure perplexity on: a file the user names, else the one shipped in pipeline/data/ (eval.txt;
    heldout.txt for the held-out check, a text no default or budget was ever chosen on)."""
    if path:
        with open(path) as fh:
            return fh.read()
    return resources.files("pipeline.data").joinpath(shipped).read_text()


def perplexity(model, tokenizer, text: str, max_tokens: int) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens].to(input_device(model))
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=ids).loss
    return math.exp(loss.float().item())


def greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    enc = tokenizer(prompt, return_tensors="pt").to(input_device(model))
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
