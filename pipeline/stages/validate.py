"""Stage 5: prove the load right, and measure how good the loaded model is.

Every check is a named boolean in report.json `validation.checks`; any false
check makes the run `failed` (exit 1) and names what failed. Metrics go to
`validation.metrics`: perplexity on the shipped evaluation text, the same for the
unquantized reference (streamed from the checkpoint, see pipeline/reference.py),
the loaded model's logits error against that reference, forward throughput and a
greedy continuation. Each check and metric is switched in conf/stages/validate.yaml.
"""
from __future__ import annotations

import logging

import torch

from ..context import LoadContext
from ..errors import CheckFailed, UserError
from ..memory_probe import device_str, measured_bytes
from ..planning import Plan
from .. import quality

log = logging.getLogger(__name__)

CHECKS = ("no_meta_tensors", "all_parameters_loaded", "all_checkpoint_tensors_used", "devices_as_planned",
          "dtypes_as_planned", "shapes_as_planned", "tied_weights_tied", "within_memory_caps",
          "plan_matches_measured", "weights_finite", "forward_finite")
METRICS = ("perplexity", "reference", "greedy", "throughput")


def validate(ctx: LoadContext, *, checks: dict | None = None, metrics: dict | None = None, plan_tolerance: float = 0.01,
             eval_text: str | None = None, max_eval_tokens: int = 512, prompt: str = "The capital of France is",
             max_new_tokens: int = 12) -> None:
    plan: Plan = ctx.require("plan", "validate", "plan")
    ctx.require("loaded", "validate", "load_shards")
    enabled = _switches(checks, CHECKS, "checks")
    wanted = _switches(metrics, METRICS, "metrics")
    model = ctx.model
    results: dict[str, bool] = {}
    failures: dict[str, str] = {}

    def check(name: str, ok: bool, why: str) -> None:
        if enabled[name]:
            results[name] = bool(ok)
            if not ok:
                failures[name] = why
                log.error("check %s failed: %s", name, why)

    offloaded = _offloaded_names(ctx.offload)
    tensors = dict(_named_tensors(model))
    meta = [n for n, t in tensors.items() if t.device.type == "meta" and n not in offloaded]
    check("no_meta_tensors", not meta, f"still on meta: {_names(meta)}")
    check("all_parameters_loaded", not plan.missing, f"missing from the checkpoint: {_names(plan.missing)}")
    check("all_checkpoint_tensors_used", not plan.unexpected, f"unused checkpoint tensors: {_names(plan.unexpected)}")
    placed = {n: offloaded.get(n, t) for n, t in tensors.items()}
    planned = [(n, t) for n, t in plan.tensors.items() if n in placed]
    check("devices_as_planned", *_mismatch(planned, placed, lambda x: _device_of(x), lambda t: t.device, "device"))
    check("dtypes_as_planned", *_mismatch(planned, placed, lambda x: x.dtype, lambda t: t.dtype, "dtype"))
    check("shapes_as_planned", *_mismatch(planned, placed, _logical_shape, lambda t: t.shape, "shape"))
    untied = [g for g in ctx.tied_groups
              if not any(n in offloaded for n in g) and len({placed[n].data_ptr() for n in g if n in placed}) > 1]
    check("tied_weights_tied", not untied, f"no longer tied: {', '.join(untied[0]) if untied else ''}")

    measured = measured_bytes(model, ctx.offload)
    predicted = plan.predicted_bytes
    plan_error = {d: round((measured.get(d, 0) - p) / p, 6) if p else 0.0 for d, p in predicted.items()}
    for d in measured:
        plan_error.setdefault(d, 1.0)
    over = [f"{d} holds {n} bytes, cap {plan.max_memory[d]}" for d, n in measured.items()
            if d in plan.max_memory and n > plan.max_memory[d]]
    check("within_memory_caps", not over, "; ".join(over))
    worst = max((abs(e) for e in plan_error.values()), default=0.0)
    check("plan_matches_measured", worst <= plan_tolerance,
          f"measured bytes differ from the plan by up to {worst:.2%} (tolerance {plan_tolerance:.2%})")
    if enabled["weights_finite"]:
        bad = [n for n, t in tensors.items() if t.device.type != "meta" and t.is_floating_point() and not torch.isfinite(t).all()]
        check("weights_finite", not bad, f"NaN/Inf in: {_names(bad)}")

    found: dict = {}
    if getattr(model, "config", None) is not None and not meta and (enabled["forward_finite"] or any(wanted.values())):
        _measure(ctx, check, found, wanted, eval_text, max_eval_tokens, prompt, max_new_tokens)

    ctx.report["validation"] = {
        "checks": results,
        "failures": failures,
        "measured_bytes": measured,
        "plan_error": plan_error,
        "metrics": found,
    }
    if failures:
        raise CheckFailed("; ".join(f"{k}: {v}" for k, v in failures.items()))


def _logical_shape(x) -> tuple:
    """A 4-bit weight is stored packed; its quant_state keeps the shape it stands for."""
    state = getattr(x, "quant_state", None)
    return tuple(state.shape) if state is not None and getattr(state, "shape", None) is not None else tuple(x.shape)


def _measure(ctx, check, found, wanted, eval_path, max_eval_tokens, prompt, max_new_tokens) -> None:
    model = ctx.model
    inputs = quality.fixed_inputs(model)
    try:
        out, tps = quality.forward_output(model, inputs)
        finite, why = bool(torch.isfinite(out).all()), "the forward pass gave NaN/Inf"
    except RuntimeError as exc:  # e.g. dtype overrides that the model's code cannot mix
        out, tps, finite, why = None, 0.0, False, f"the forward pass raised {str(exc).splitlines()[0][:200]}"
    check("forward_finite", finite, why)
    if wanted["throughput"]:
        found["forward_tokens_per_s"] = round(tps, 1)
    if out is None:
        return
    tokenizer = quality.load_tokenizer(ctx.checkpoint.directory) if quality.is_causal_lm(model) else None
    text = quality.eval_text(eval_path) if tokenizer is not None and wanted["perplexity"] else None
    if text is not None:
        found["perplexity"] = round(quality.perplexity(model, tokenizer, text, max_eval_tokens), 4)
    if wanted["reference"]:
        _compare_with_reference(ctx, inputs, out, tokenizer, text, max_eval_tokens, found)
    if tokenizer is not None and wanted["greedy"] and max_new_tokens:
        found["prompt"] = prompt
        found["continuation"] = quality.greedy(model, tokenizer, prompt, max_new_tokens)


def _compare_with_reference(ctx, inputs, out, tokenizer, text, max_eval_tokens, found) -> None:
    if ctx.quantization.get("method", "none") == "none":
        found["reference"] = "the loaded model is unquantized: it is its own reference"
        if "perplexity" in found:
            found["reference_perplexity"] = found["perplexity"]
        found["logits_rel_error"] = 0.0
        return
    from ..reference import streamed_reference

    ref = streamed_reference(ctx)
    if ref is None:
        return
    ref_out, _ = quality.forward_output(ref, inputs)
    found["reference"] = "unquantized, streamed layer by layer from the checkpoint"
    found["reference_dtype"] = ctx.dtype_policy[0]  # the dtype policy of everything quantization leaves alone
    found["logits_rel_error"] = round(quality.relative_error(out, ref_out), 6)
    if not quality.is_causal_lm(ctx.model):
        found["output_cosine_to_reference"] = round(quality.mean_cosine(out, ref_out), 6)
    if text is not None:
        found["reference_perplexity"] = round(quality.perplexity(ref, tokenizer, text, max_eval_tokens), 4)


def _switches(given, names, key) -> dict[str, bool]:
    out = {n: n != "weights_finite" for n in names}
    for k, v in (given or {}).items():
        if k not in out:
            raise UserError(f"stages.validate.{key}.{k}: unknown {key[:-1]}; choose from {', '.join(names)}")
        out[k] = bool(v)
    return out


def _mismatch(planned, placed, actual, expected, what) -> tuple[bool, str]:
    wrong = [n for n, t in planned if actual(placed[n]) != expected(t)]
    detail = ", ".join(f"{n} ({what} {actual(placed[n])}, planned {expected(t)})" for n, t in planned if n in wrong[:3])
    return not wrong, f"{len(wrong)} tensors differ from the plan: {detail}"


def _names(names) -> str:
    names = list(names)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


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
        seen.add(n)
        yield n, p
    for n, b in model.named_buffers(remove_duplicate=False):
        if n not in seen:
            yield n, b
