"""Stage 5: prove the load right (measure/checks.py), and measure how good the model is (measure/metrics.py).

Every check is a named boolean in report.json `validation.checks`; any false check
makes the run `failed` (exit 1) and names what failed. A check or metric that cannot
run on this kind of model is listed in `validation.skipped` with its reason. Metrics go to
`validation.metrics`: perplexity on the shipped evaluation text, the same for the
unquantized reference (streamed from the checkpoint, measure/reference.py), the
loaded model's logits error against it, forward throughput and a greedy continuation.
"""

from __future__ import annotations

from ..errors import CheckFailed, UserError
from ..measure import single_process
from ..measure.cache import metric_cache
from ..measure.checks import CHECKS, PARALLEL_CHECKS, CheckLog, check_memory, check_tensors, check_weights_finite
from ..measure.memory import device_str
from ..measure.metrics import METRICS, OFF_BY_DEFAULT, Costs, MetricSettings, measure_quality
from ..measure.quality import input_device
from ..measure.reference import streamed_reference
from ..quant.cpu_numerics import measured_portably
from ..schema import CheckpointSchema
from .context import LoadContext
from .traits import stage


@stage(measures=True)
def validate(
    ctx: LoadContext,
    *,
    checks: dict[str, bool] | None = None,
    metrics: dict[str, bool] | None = None,
    plan_tolerance: float = 0.01,
    single_process_tolerance: float = 1e-5,
    eval_text: str | None = None,
    heldout_text: str | None = None,
    max_eval_tokens: int = 512,
    prompt: str = "The capital of France is",
    max_new_tokens: int = 12,
    trust_remote_code: bool = CheckpointSchema.trust_remote_code,
    weights_finite_sample: int | None = None,
    progress_interval: float = 2.0,
) -> None:
    plan = ctx.require("plan", "validate", "plan")
    ctx.require("loaded", "validate", "load_shards")
    check = CheckLog(_switches(checks, CHECKS + PARALLEL_CHECKS, "checks"))
    settings = MetricSettings(
        _switches(metrics, METRICS, "metrics"), eval_text, heldout_text, max_eval_tokens, prompt, max_new_tokens,
        trust_remote_code,
        portable=measured_portably(ctx.quant, plan.tensors.values()),  # the same figures on every CPU (issue 30)
        progress_interval=progress_interval,  # seconds between progress lines of the reference, perplexity, greedy
    )  # fmt: skip
    model = ctx.model
    meta = check_tensors(model, plan, ctx.tied_groups, ctx.offload, check, ctx.floating)
    measured, plan_error = check_memory(model, plan, ctx.offload, check, plan_tolerance)
    finite = check_weights_finite(model, check, weights_finite_sample or None)
    found, costs = {}, Costs()
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
            make_reference=ctx.parallel.reference(lambda: _reference(ctx)),  # tensor parallel: rank 0's only
            reference_dtype=ctx.dtype_policy.name,
            cache=ctx.parallel.cache(lambda: _cache(ctx, settings)),  # tensor parallel: none
            costs=costs,
        )
    _across_processes(ctx, check, (measured, plan_error), found, bool(meta), settings, single_process_tolerance)
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


def _across_processes(ctx: LoadContext, check: CheckLog, memory, found: dict, meta: bool, settings, tolerance):
    """The strategy's part. Tensor parallel: the gathered logits against the single-process model (no forward
    while tensors are on meta), then every rank's checks merged; one process: nothing."""
    model = ctx.model
    ctx.parallel.validate(
        check, ctx.report, measured=memory[0], plan_error=memory[1], run_dir=ctx.run_dir,
        forward=None if meta else lambda: single_process.sharded_logits(model, settings.portable),
        compare=lambda logits: single_process.compare(
            logits, lambda: _reference(ctx), model, quantized=ctx.quant.enabled, tolerance=tolerance,
            known_error=found.get("logits_rel_error"), portable=settings.portable,
        ),
    )  # fmt: skip


def _cache(ctx: LoadContext, settings: MetricSettings):
    device = device_str(input_device(ctx.model))
    node = ctx.cfg.checkpoint.get("model") if "checkpoint" in ctx.cfg else None
    return metric_cache(
        ctx.checkpoint, ctx.plan, ctx.dtype_policy, ctx.quant, settings, device,
        model=ctx.model, node=node, offload=ctx.offload,
    )  # fmt: skip


def _switches(given, names, key) -> dict[str, bool]:
    out = {name: name not in OFF_BY_DEFAULT for name in names}
    for k, v in (given or {}).items():
        if k not in out:
            raise UserError(f"stages.validate.{key}.{k}: unknown {key[:-1]}; choose from {', '.join(names)}")
        if not isinstance(v, bool):
            raise UserError(f"stages.validate.{key}.{k}: {v!r} is not true or false; set it to true or false")
        out[k] = v
    return out
