"""Stage 5: prove the load right, and measure how good the loaded model is.

Every check is a named boolean in report.json `validation.checks`; any false
check makes the run `failed` (exit 1). Metrics (perplexity on the shipped
evaluation text, a greedy continuation, forward throughput) go to
`validation.metrics`. Each check and metric can be switched off in
conf/stages/validate.yaml.
"""
from __future__ import annotations

import logging
import math
import time
from importlib import resources

import torch

from ..context import LoadContext
from ..errors import CheckFailed
from ..memory_probe import device_str, measured_bytes
from ..planning import Plan

log = logging.getLogger(__name__)


def validate(ctx: LoadContext, *, forward: bool = True, plan_tolerance: float = 0.01, nan_scan: bool = False,
             perplexity: bool = True, eval_text: str | None = None, max_eval_tokens: int = 512,
             prompt: str = "The capital of France is", max_new_tokens: int = 12) -> None:
    plan: Plan = ctx.require("plan", "validate", "plan")
    ctx.require("loaded", "validate", "load_shards")
    model = ctx.model
    checks: dict[str, bool] = {}
    problems: dict[str, str] = {}

    offloaded = _offloaded_names(ctx.offload)
    meta = [n for n, p in _named_tensors(model) if p.device.type == "meta" and n not in offloaded]
    _check(checks, problems, "no_meta_tensors", not meta, f"still on meta: {', '.join(meta[:5])}")
    _check(checks, problems, "all_parameters_loaded", not plan.missing, f"missing from the checkpoint: {', '.join(plan.missing[:5])}")
    _check(checks, problems, "all_checkpoint_tensors_used", not plan.unexpected, f"unused checkpoint tensors: {', '.join(plan.unexpected[:5])}")
    placed = {n: offloaded.get(n, p) for n, p in _named_tensors(model)}
    wrong_dev = [n for n, t in plan.tensors.items() if n in placed and _device_of(placed[n]) != t.device]
    wrong_dtype = [n for n, t in plan.tensors.items() if n in placed and placed[n].dtype != t.dtype]
    wrong_shape = [n for n, t in plan.tensors.items() if n in placed and tuple(placed[n].shape) != t.shape]
    _check(checks, problems, "devices_as_planned", not wrong_dev, f"on another device than planned: {', '.join(wrong_dev[:5])}")
    _check(checks, problems, "dtypes_as_planned", not wrong_dtype, f"another dtype than planned: {', '.join(wrong_dtype[:5])}")
    _check(checks, problems, "shapes_as_planned", not wrong_shape, f"another shape than planned: {', '.join(wrong_shape[:5])}")
    untied = [g for g in ctx.tied_groups
              if not any(n in offloaded for n in g) and len({placed[n].data_ptr() for n in g if n in placed}) > 1]
    _check(checks, problems, "tied_weights_tied", not untied, f"no longer tied: {untied[:1]}")

    measured = measured_bytes(model, ctx.offload)
    predicted = plan.predicted_bytes
    plan_error = {d: round((measured.get(d, 0) - p) / p, 6) if p else 0.0 for d, p in predicted.items()}
    for d in measured:
        plan_error.setdefault(d, 1.0)
    over_cap = [d for d, n in measured.items() if d in plan.max_memory and n > plan.max_memory[d]]
    _check(checks, problems, "within_memory_caps", not over_cap, f"over their cap: {over_cap}")
    worst = max((abs(e) for e in plan_error.values()), default=0.0)
    _check(checks, problems, "plan_matches_measured", worst <= plan_tolerance,
           f"measured bytes differ from the plan by up to {worst:.2%} (tolerance {plan_tolerance:.2%})")
    if nan_scan:
        bad = [n for n, t in _named_tensors(model) if t.is_floating_point() and not torch.isfinite(t).all()]
        _check(checks, problems, "weights_finite", not bad, f"NaN/Inf in: {', '.join(bad[:5])}")

    metrics: dict = {}
    if forward and not meta and getattr(model, "config", None) is not None:
        try:
            finite, tps = _forward_check(model)
            why = "the forward pass gave NaN/Inf"
        except RuntimeError as exc:  # e.g. dtype overrides that the model's code cannot mix
            finite, tps, why = False, 0.0, f"the forward pass raised {str(exc).splitlines()[0][:200]}"
        _check(checks, problems, "forward_finite", finite, why)
        metrics["forward_tokens_per_s"] = round(tps, 1)
        tokenizer = _tokenizer(ctx)
        if tokenizer is not None and _is_causal_lm(model):
            if perplexity:
                metrics["perplexity"] = round(_perplexity(model, tokenizer, _eval_text(eval_text), max_eval_tokens), 4)
            if max_new_tokens:
                metrics["prompt"] = prompt
                metrics["continuation"] = _greedy(model, tokenizer, prompt, max_new_tokens)

    ctx.report["validation"] = {
        "checks": checks,
        "failures": problems,
        "measured_bytes": measured,
        "plan_error": plan_error,
        "metrics": metrics,
    }
    if problems:
        raise CheckFailed("; ".join(f"{k}: {v}" for k, v in problems.items()))


def _check(checks, problems, name, ok, why):
    checks[name] = bool(ok)
    if not ok:
        problems[name] = why
        log.error("check %s failed: %s", name, why)


class _OnDisk:
    """Stands for a tensor accelerate reads from the checkpoint at forward time."""

    def __init__(self, info):
        self.dtype = getattr(torch, info["dtype"])
        self.shape = tuple(info["shape"])


def _offloaded_names(loader) -> dict:
    """name -> the offloaded tensor (CPU copy) or an _OnDisk stand-in."""
    if loader is None:
        return {}
    out = {n: _OnDisk(info) for n, info in loader.index.items()}
    out.update(loader.state_dict)
    return out


def _device_of(t) -> str:
    return "disk" if isinstance(t, _OnDisk) else device_str(t.device)


def _named_tensors(model):
    seen = set()
    for n, p in model.named_parameters(remove_duplicate=False):
        yield n, p
        seen.add(n)
    for n, b in model.named_buffers(remove_duplicate=False):
        if n not in seen:
            yield n, b


def _input_device(model) -> torch.device:
    """Where inputs go: the embedding's execution device (accelerate's hook knows it when offloaded)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(emb, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        dev = hook.execution_device
        return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    if emb is not None and emb.weight.device.type != "meta":
        return emb.weight.device
    return next(p.device for p in model.parameters() if p.device.type != "meta")


def _forward_check(model) -> tuple[bool, float]:
    """A forward pass on fixed token ids; (all outputs finite, tokens per second)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or 2
    ids = (torch.arange(32) * 7 % vocab).unsqueeze(0).to(_input_device(model))
    kwargs = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids[:, :8]
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(**kwargs)
    seconds = time.perf_counter() - start
    tensors = [out] if isinstance(out, torch.Tensor) else [v for v in (out.values() if hasattr(out, "values") else out) if isinstance(v, torch.Tensor)]
    finite = all(torch.isfinite(t.float()).all().item() for t in tensors if t.is_floating_point())
    return finite, ids.numel() / max(seconds, 1e-9)


def _is_causal_lm(model) -> bool:
    config = getattr(model, "config", None)
    return hasattr(model, "generate") and config is not None and not getattr(config, "is_encoder_decoder", False) \
        and model.get_output_embeddings() is not None


def _tokenizer(ctx: LoadContext):
    import os

    root = ctx.checkpoint.directory
    if not any(os.path.exists(os.path.join(root, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(root, local_files_only=True)
    except Exception as exc:  # a broken tokenizer must not hide the load's own result
        log.warning("no tokenizer from %s (%s); perplexity and generation skipped", root, exc.__class__.__name__)
        return None


def _eval_text(path: str | None) -> str:
    if path:
        with open(path) as fh:
            return fh.read()
    return resources.files("pipeline.data").joinpath("eval.txt").read_text()


def _perplexity(model, tokenizer, text: str, max_tokens: int) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens].to(_input_device(model))
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=ids).loss
    return math.exp(loss.float().item())


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    enc = tokenizer(prompt, return_tensors="pt").to(_input_device(model))
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
