"""Quality measurements on a loaded model: forward on fixed tokens, perplexity, greedy text."""

from __future__ import annotations

import math
import os
import time
from importlib import resources

import torch


def input_device(model) -> torch.device:
    """Where inputs go: the embedding's execution device (accelerate's hook knows it when offloaded)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(emb, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        dev = hook.execution_device
        return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    if emb is not None and emb.weight.device.type != "meta":
        return emb.weight.device
    return next(p.device for p in model.parameters() if p.device.type != "meta")


def fixed_inputs(model) -> dict:
    """The same 32 token ids for every run (decoder inputs too for encoder-decoders)."""
    config = model.config
    vocab = getattr(config, "vocab_size", None) or 2
    ids = (torch.arange(32) * 7 % vocab).unsqueeze(0).to(input_device(model))
    kwargs = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids[:, :8]
    return kwargs


def forward_output(model, inputs: dict) -> tuple[torch.Tensor, float]:
    """(the main output: logits, else last_hidden_state; tokens per second)."""
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(**inputs)
    seconds = time.perf_counter() - start
    main = getattr(out, "logits", None)
    if main is None:
        main = getattr(out, "last_hidden_state", None)
    if main is None:
        main = out[0] if isinstance(out, (tuple, list)) else out
    return main.float().cpu(), inputs["input_ids"].numel() / max(seconds, 1e-9)


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


def load_tokenizer(root: str):
    """The checkpoint's own tokenizer, or None when it ships none."""
    if not any(
        os.path.exists(os.path.join(root, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(root, local_files_only=True)


def eval_text(path: str | None) -> str:
    """The evaluation text: a file the user names, else the one shipped in pipeline/data/eval.txt."""
    if path:
        with open(path) as fh:
            return fh.read()
    return resources.files("pipeline.data").joinpath("eval.txt").read_text()


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
