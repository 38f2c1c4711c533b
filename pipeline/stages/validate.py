"""Stage 5: prove the load right (measure/checks.py), and measure how good the model is (measure/metrics.py).

Every check is a named boolean in report.json `validation.checks`; any false check
makes the run `failed` (exit 1) and names what failed. Metrics go to
`validation.metrics`: perplexity on the shipped evaluation text, the same for the
unquantized reference (streamed from the checkpoint, measure/reference.py), the
loaded model's logits error against it, forward throughput and a greedy continuation.
"""

from __future__ import annotations

from ..errors import CheckFailed, UserError
from ..measure.cache import metric_cache
from ..measure.checks import CHECKS, CheckLog, check_memory, check_tensors, check_weights_finite
from ..measure.memory import device_str
from ..measure.metrics import METRICS, Costs, MetricSettings, measure_quality
from ..measure.quality import input_device
from ..measure.reference import streamed_reference
from .context import LoadContext


def validate(
    ctx: LoadContext,
    *,
    checks: dict | None = None,
    metrics: dict | None = None,
    plan_tolerance: float = 0.01,
    eval_text: str | None = None,
    max_eval_tokens: int = 512,
    prompt: str = "The capital of France is",
    max_new_tokens: int = 12,
) -> None:
    plan = ctx.require("plan", "validate", "plan")
    ctx.require("loaded", "validate", "load_shards")
    check = CheckLog(_switches(checks, CHECKS, "checks"))
    settings = MetricSettings(
        _switches(metrics, METRICS, "metrics"), eval_text, max_eval_tokens, prompt, max_new_tokens
    )
    model = ctx.model
    meta = check_tensors(model, plan, ctx.tied_groups, ctx.offload, check)
    measured, plan_error = check_memory(model, plan, ctx.offload, check, plan_tolerance)
    check_weights_finite(model, check)
    found: dict = {}
    costs = Costs()
    if (
        getattr(model, "config", None) is not None
        and not meta
        and (check.enabled["forward_finite"] or any(settings.wanted.values()))
    ):
        found = measure_quality(
            model,
            ctx.checkpoint.directory,
            check,
            settings,
            quantized=ctx.quant.enabled,
            make_reference=lambda: _reference(ctx),
            reference_dtype=ctx.dtype_policy.name,
            cache=_cache(ctx, settings),
            costs=costs,
        )
    ctx.report["validation"] = {
        "checks": check.results,
        "failures": check.failures,
        "measured_bytes": measured,
        "plan_error": plan_error,
        "metrics": found,
        "metric_costs": costs.entries,  # seconds per metric, and whether it came from measure/cache.py
    }
    if check.failures:
        raise CheckFailed("; ".join(f"{k}: {v}" for k, v in check.failures.items()))


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


def _cache(ctx: LoadContext, settings: MetricSettings):
    device = device_str(input_device(ctx.model))
    return metric_cache(ctx.checkpoint, ctx.plan, ctx.dtype_policy, ctx.quant, settings, device)


def _switches(given, names, key) -> dict[str, bool]:
    out = {n: n != "weights_finite" for n in names}
    for k, v in (given or {}).items():
        if k not in out:
            raise UserError(f"stages.validate.{key}.{k}: unknown {key[:-1]}; choose from {', '.join(names)}")
        out[k] = bool(v)
    return out
