"""Stage 5: prove the load right (measure/checks.py), and measure how good the model is (measure/metrics.py).

Every check is a named boolean in report.json `validation.checks`; any false check
makes the run `failed` (exit 1) and names what failed. A check or metric that cannot
run on this kind of model is listed in `validation.skipped` with its reason. Metrics go to
`validation.metrics`: perplexity on the shipped evaluation text, the same for the
unquantized reference (streamed from the checkpoint, measure/reference.py), the
loaded model's logits error against it, forward throughput and a greedy continuation.
"""

from __future__ import annotations

import torch

from ..errors import CheckFailed, UserError
from ..measure import single_process
from ..measure.cache import metric_cache
from ..measure.checks import CHECKS, PARALLEL_CHECKS, CheckLog, check_memory, check_tensors, check_weights_finite
from ..measure.memory import device_str
from ..measure.metrics import METRICS, Costs, MetricSettings, measure_quality
from ..measure.quality import input_device
from ..measure.reference import streamed_reference
from ..parallel.group import all_gather, broadcast
from ..quant.cpu_numerics import measured_portably
from .context import LoadContext


def validate(
    ctx: LoadContext,
    *,
    checks: dict[str, bool] | None = None,
    metrics: dict[str, bool] | None = None,
    plan_tolerance: float = 0.01,
    single_process_tolerance: float = 1e-5,
    eval_text: str | None = None,
    max_eval_tokens: int = 512,
    prompt: str = "The capital of France is",
    max_new_tokens: int = 12,
    trust_remote_code: bool = False,
    weights_finite_sample: int | None = None,
) -> None:
    plan = ctx.require("plan", "validate", "plan")
    ctx.require("loaded", "validate", "load_shards")
    check = CheckLog(_switches(checks, CHECKS + PARALLEL_CHECKS, "checks"))
    settings = MetricSettings(
        _switches(metrics, METRICS, "metrics"), eval_text, max_eval_tokens, prompt, max_new_tokens, trust_remote_code,
        portable=measured_portably(ctx.quant, plan.tensors.values()),  # the same figures on every CPU (issue 30)
    )  # fmt: skip
    model = ctx.model
    meta = check_tensors(model, plan, ctx.tied_groups, ctx.offload, check, ctx.floating)
    measured, plan_error = check_memory(model, plan, ctx.offload, check, plan_tolerance)
    finite = check_weights_finite(model, check, weights_finite_sample or None)
    found: dict = {}
    costs = Costs()
    unmeasurable = _unmeasurable(model, meta)
    if unmeasurable:
        for name in ("forward_finite", *(m for m, on in settings.wanted.items() if on)):
            check.skip(name, unmeasurable)
    elif check.enabled["forward_finite"] or any(settings.wanted.values()):
        found = measure_quality(
            model,
            ctx.checkpoint.directory,
            check,
            settings,
            quantized=ctx.quant.enabled,
            make_reference=lambda: _reference(ctx) if ctx.parallel.is_main else None,
            reference_dtype=ctx.dtype_policy.name,
            cache=_cache(ctx, settings),
            costs=costs,
        )
    if ctx.parallel.enabled and not meta:
        _against_single_process(ctx, check, single_process_tolerance, found.get("logits_rel_error"), settings.portable)
    if ctx.parallel.enabled:
        _merge_ranks(ctx, check, measured, plan_error)
    ctx.report["validation"] = {
        "checks": check.results,
        "failures": check.failures,
        "measured_bytes": measured,
        "plan_error": plan_error,
        "metrics": found,
        "skipped": check.skipped,
        "weights_finite": finite,  # what the NaN/Inf scan read: every element, or its sample, and its seconds
        "metric_costs": costs.entries,  # seconds per metric, and whether it came from measure/cache.py
        "metric_cache": costs.cache,  # what the cache checked first (weights' fingerprint, shards' hash) and its cost
    }
    if check.failures:
        raise CheckFailed("; ".join(f"{k}: {v}" for k, v in check.failures.items()))


def _unmeasurable(model, meta: list[str]) -> str:
    """Why no forward pass can run on this model at all ('' when it can)."""
    if getattr(model, "config", None) is None:
        return f"{type(model).__name__} has no transformers config to build inputs from"
    if meta:
        return "tensors are still on meta (see no_meta_tensors)"
    return ""


def _reference(ctx: LoadContext):
    return streamed_reference(
        ctx.model,
        ctx.checkpoint,
        ctx.plan,
        ctx.dtype_policy,
        ctx.quant,
        tied_groups=ctx.tied_groups,
        keep_in_fp32=ctx.keep_in_fp32,
        no_split=ctx.no_split,
    )


def _against_single_process(ctx: LoadContext, check: CheckLog, tolerance: float, known_error, portable: bool) -> None:
    """Tensor parallel: every rank runs the sharded forward; rank 0 compares it with the single-process model."""
    logits = single_process.sharded_logits(ctx.model, portable)
    found = None
    if ctx.parallel.is_main:
        found = single_process.compare(
            logits,
            lambda: _reference(ctx),
            ctx.model,
            quantized=ctx.quant.enabled,
            tolerance=tolerance,
            known_error=known_error,
            portable=portable,
        )
        if ctx.parallel.save_logits:
            torch.save(logits, ctx.run_dir / "logits.pt")
    found = broadcast(found, ctx.parallel)  # every rank records the same checks, so every rank exits alike
    if found.get("matches") is not None:
        why = (
            f"gathered logits differ from the single-process model by {found['max_abs_diff']:.3g} "
            f"(tolerance {tolerance:g} x {found['max_abs_reference']:.3g})"
        )
        check("matches_single_process", found["matches"], why)
    ctx.report["parallel"]["logits"] = found


def _merge_ranks(ctx: LoadContext, check: CheckLog, measured: dict, plan_error: dict) -> None:
    """Every rank's checks and memory in the report; a check holds only if it holds on every rank."""
    mine = {"checks": check.results, "failures": check.failures, "measured": measured, "error": plan_error}
    rows = all_gather(mine, ctx.parallel)
    merged = {name: all(r["checks"].get(name, True) for r in rows) for name in check.results}
    failures: dict[str, str] = {}
    for rank, row in enumerate(rows):
        entry = ctx.report["parallel"]["ranks"][rank]
        entry["measured_bytes"] = sum(row["measured"].values())
        entry["plan_error"] = max(row["error"].values(), key=abs, default=0.0)
        entry["checks_passed"] = all(row["checks"].values())
        for name, why in row["failures"].items():
            failures[name] = f"{failures[name]}; rank {rank}: {why}" if name in failures else f"rank {rank}: {why}"
    check.results, check.failures = merged, failures


def _cache(ctx: LoadContext, settings: MetricSettings):
    """None under tensor parallel: a hit on one rank and a miss on another would part their collectives."""
    if ctx.parallel.enabled:
        return None
    device = device_str(input_device(ctx.model))
    node = ctx.cfg.checkpoint.get("model") if "checkpoint" in ctx.cfg else None
    return metric_cache(
        ctx.checkpoint, ctx.plan, ctx.dtype_policy, ctx.quant, settings, device,
        model=ctx.model, node=node, offload=ctx.offload,
    )  # fmt: skip


def _switches(given, names, key) -> dict[str, bool]:
    out = dict.fromkeys(names, True)
    for k, v in (given or {}).items():
        if k not in out:
            raise UserError(f"stages.validate.{key}.{k}: unknown {key[:-1]}; choose from {', '.join(names)}")
        if not isinstance(v, bool):
            raise UserError(f"stages.validate.{key}.{k}: {v!r} is not true or false; set it to true or false")
        out[k] = v
    return out
