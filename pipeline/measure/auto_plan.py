"""quantization=auto: per-module methods chosen from measured sensitivities, confirmed by perplexity.

Runs in the plan stage, before any weight is loaded: the unquantized reference is streamed from the
checkpoint (measure/reference.py), one forward on the evaluation text measures every module's
sensitivity (measure/sensitivity.py) and two more the all-int8 and all-nf4 perplexities that
calibrate the additive model (quant/mixed.py), which orders the plans from all-nf4 to all-keep; a
bisection along that order by the plans' simulated perplexity (the real bitsandbytes modules, on the same
text) finds the smallest within the budget. The measurements are cached (keyed like the reference).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import replace

from ..dtypes import itemsize
from ..errors import UserError
from ..planning import build_plan
from ..quant import mixed
from ..quant.sizes import quantized_nbytes
from ..quant.spec import QuantSpec
from ..quant.targets import QuantSelection, select_quantized_modules
from ..sizes import format_bytes
from . import cache, quality
from .reference import streamed_reference
from .sensitivity import QuantizedCopies, measure_sensitivity, simulated_perplexity

log = logging.getLogger(__name__)
MAX_TOKENS = 512  # as validate's perplexity (stages.validate.metrics.max_eval_tokens default)
SCAN = 8  # a budget's search measures 1/8, 2/8, ... of the order until one is within, then bisects below it
SKIP = 0.03  # scan points predicted over the budget by more (log-perplexity) are not measured (_Probe.hopeful)
TOLERANCE = 0.005  # a budget's search stops when a miss and a pass differ by less than this share of all-keep bytes


def choose_methods(ctx, checkpoint, policy, spec: QuantSpec, selection: QuantSelection, caps_error=None):
    """(the resolved spec: int8 with per-module methods, its selection, the `auto` section of plan.json and
    report.json). `caps_error(spec, selection)`: None when that plan holds in the memory caps the user gave, else
    why not (one line); None instead of the function: no caps given."""
    if spec.budget is None and caps_error is None:
        raise UserError(
            "quantization.budget: quantization=auto needs a quality budget, memory caps or both; "
            "add quantization.budget=1% or memory.max_memory={...}"
        )
    start = time.perf_counter()
    ref, ids = _reference(ctx, checkpoint, policy)
    # the numerics validate will measure the loaded model under (int8 on the CPU: portable, quant/cpu_numerics.py)
    portable = spec.cpu_numerics == "portable" and quality.input_device(ref).type == "cpu"
    with quality.measuring(ref, portable):
        copies = QuantizedCopies()  # quantized modules kept between this search's forwards (bounded)
        measured, cached = _measurements(ctx, checkpoint, policy, spec, ref, ids, selection.modules, portable, copies)
        errors, base = measured["errors"], measured["reference_perplexity"]
        totals = {k: math.log(measured[f"all_{k}_perplexity"] / base) for k in ("int8", "nf4")}
        cost = mixed.costs(errors, totals)
        nbytes = {m: _module_bytes(ref.get_submodule(m).weight, spec) for m in selection.modules}
        error = None if caps_error is None else (lambda methods: caps_error(*_resolved(ctx, spec, methods)))
        methods, rounds, chosen = _chosen(ref, ids, spec, cost, nbytes, base, error, copies)
    doc = {
        "budget": spec.budget,
        "caps": caps_error is not None,
        "numerics": "portable" if portable else "native",
        "reference_perplexity": round(base, 4),
        "all_int8_perplexity": round(measured["all_int8_perplexity"], 4),
        "all_nf4_perplexity": round(measured["all_nf4_perplexity"], 4),
        "rounds": rounds,
        "chosen_plan": chosen["plan"],  # the plan's place in the greedy order (rounds: every plan measured)
        "predicted_perplexity": chosen["predicted"],
        "confirmed_perplexity": chosen["measured"],
        "module_bytes": mixed.total_bytes(methods, nbytes),
        "counts": _counts(methods),
        "modules": {m: {"method": k, "sensitivity": errors[m]} for m, k in methods.items()},
        "sensitivities_cached": cached,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return (*_resolved(ctx, spec, methods), doc)


def _resolved(ctx, spec: QuantSpec, methods: dict[str, str]):
    """The plan's spec (int8 with every other module's method named) and its selection."""
    others = tuple((m, k) for m, k in methods.items() if k != "int8")
    resolved = replace(spec, method="int8", methods=others, budget=None)
    kept = dict(tied_groups=ctx.tied_groups, keep_in_fp32=ctx.keep_in_fp32)
    return resolved, select_quantized_modules(ctx.model, resolved, **kept)


def _chosen(ref, ids, spec: QuantSpec, cost, nbytes, base: float, caps_error, copies):
    """(methods, the measured plans, the chosen one's), along the greedy's plans (quant/mixed.py Plans): under
    caps only, the largest plan that fits, measured once; with a budget, the smallest plan whose measured
    perplexity is within it (a scan, then bisection), among those that fit when caps are given, else exit 2
    naming the best plan that fits and what it measures."""
    plans = mixed.Plans(cost, nbytes)
    top = len(plans) - 1  # every module kept: the reference itself
    if caps_error is not None:
        top = plans.last(lambda methods: caps_error(methods) is None)
        if top is None:
            raise UserError(f"{caps_error(plans.at(0))}; quantization=auto: not even every module nf4 fits")
    probe = _Probe(ref, ids, spec, cost, nbytes, base, plans, copies)
    if spec.budget is None:
        return plans.at(top), probe.rounds, probe.measure(top)
    if top < len(plans) - 1 and not probe(top):
        best = probe.measure(top)
        raise UserError(
            f"quantization.budget: no plan that fits memory.max_memory is within {spec.budget:.2%}; the best that "
            f"fits ({format_bytes(best['bytes'])} of weights) measures {best['measured'] / base - 1:+.2%}: raise "
            "quantization.budget to that, or the caps"
        )
    # A coarse scan from the small end first: measured perplexity is not monotone along the order (the modules'
    # errors partly cancel), so a bisection over the whole order can step past small plans that are within.
    grid = [top * i // SCAN for i in range(1, SCAN)] + [top]
    hi = next(k for k in grid if k == top or (probe.hopeful(k) and probe(k)))  # top is within: checked above
    lo = max([k + 1 for k in grid if k < hi], default=0)
    whole = mixed.total_bytes(plans.at(len(plans) - 1), nbytes)
    close = lambda lo, hi: probe.size(hi) - probe.size(lo) < TOLERANCE * whole  # noqa: E731
    k = plans.first(probe, lo, hi, close)
    return plans.at(k), probe.rounds, probe.measure(k)


class _Probe:
    """Whether plan k is within the budget, by its simulated perplexity (measured once per plan; the plan that
    keeps every module is the reference, never measured); every measurement is a round of the report."""

    def __init__(self, ref, ids, spec: QuantSpec, cost, nbytes, base: float, plans, copies):
        self.ref, self.ids, self.spec, self.cost, self.nbytes, self.base, self.plans = ref, ids, spec, cost, nbytes, base, plans  # fmt: skip
        self.copies = copies
        self.rounds: list[dict] = []
        self._found: dict[int, dict] = {}

    def size(self, k: int) -> int:
        return mixed.total_bytes(self.plans.at(k), self.nbytes)

    def measure(self, k: int) -> dict:
        if k not in self._found:
            methods = self.plans.at(k)
            kept = all(v == "keep" for v in methods.values())
            ppl = self.base if kept else simulated_perplexity(self.ref, methods, self.spec, self.ids, self.copies)
            entry = {"plan": k, "bytes": self.size(k), "predicted": _ppl(self.base, mixed.predicted(methods, self.cost)),
                     "measured": round(ppl, 4)}  # fmt: skip
            log.info("auto: plan %d %s, %s: perplexity predicted %s, measured %s (unquantized %.4f)", k,
                     _counts(methods), format_bytes(entry["bytes"]), entry["predicted"], entry["measured"], self.base)  # fmt: skip
            self._found[k] = entry
            self.rounds.append(entry)
        return self._found[k]

    def hopeful(self, k: int) -> bool:
        """Worth measuring: the additive model predicts at most the budget plus SKIP. It under-predicts as a
        rule; its largest over-prediction seen (SmolLM2, docs/quantization.md) was +1.6% for a plan that
        measured -0.4%: 2 points."""
        return mixed.predicted(self.plans.at(k), self.cost) <= math.log1p(self.spec.budget) + SKIP

    def __call__(self, k: int) -> bool:
        return math.log(self.measure(k)["measured"] / self.base) <= math.log1p(self.spec.budget)


def _counts(methods: dict[str, str]) -> dict[str, int]:
    return {k: sum(v == k for v in methods.values()) for k in mixed.ORDER}


def _ppl(base: float, log_increase: float) -> float:
    return round(base * math.exp(log_increase), 4)


def _module_bytes(weight, spec: QuantSpec) -> dict[str, int]:
    """One module's weight bytes under each choice (keep: its planned dtype)."""
    shape = tuple(weight.shape)
    return {
        "keep": math.prod(shape) * itemsize(weight.dtype),
        "int8": quantized_nbytes(shape, replace(spec, method="int8", methods=())),
        "nf4": quantized_nbytes(shape, replace(spec, method="nf4", methods=())),
    }


def _reference(ctx, checkpoint, policy):
    """The streamed unquantized model and the evaluation text's token ids (exit 2 when either cannot be had)."""
    trust = bool(ctx.cfg.checkpoint.get("trust_remote_code", False)) if ctx.cfg is not None else False
    tokenizer = quality.load_tokenizer(ctx.checkpoint_path, trust) if ctx.checkpoint_path else None
    if tokenizer is None or not quality.is_causal_lm(ctx.model):
        raise UserError(
            "quantization=auto: the budget is a perplexity on the evaluation text, which needs a causal LM with "
            "a tokenizer; this checkpoint has none: use quantization=int8 or nf4"
        )
    parts = dict(tied_groups=ctx.tied_groups, keep_in_fp32=ctx.keep_in_fp32, no_split=ctx.no_split)
    unquantized = build_plan(
        ctx.model, checkpoint, policy=policy, spec=QuantSpec(), selection=QuantSelection([]),
        strategy="explicit", explicit_map={"": "disk"}, max_memory={}, assemble_from_disk=True, **parts,
    )  # fmt: skip
    ref = streamed_reference(ctx.model, checkpoint, unquantized, policy, QuantSpec(), **parts)
    if ref is None:
        raise UserError("quantization=auto: the checkpoint cannot be streamed unquantized (safetensors only)")
    ids = tokenizer(quality.eval_text(None), return_tensors="pt").input_ids[:, :MAX_TOKENS]
    return ref, ids.to(quality.input_device(ref))


def _measurements(ctx, checkpoint, policy, spec, ref, ids, modules, portable: bool, copies) -> tuple[dict, bool]:
    """Sensitivities and the unquantized, all-int8 and all-nf4 perplexities: from the cache, else measured."""
    path = _cache_path(ctx, checkpoint, policy, spec, portable)
    try:
        entry = json.loads(path.read_text()) if path is not None and path.exists() else None
    except (OSError, ValueError):
        entry = None
    if isinstance(entry, dict) and set(entry.get("errors", {})) == set(modules):
        return entry, True
    log.info("auto: measuring %d modules' sensitivity on %d tokens (streamed reference)", len(modules), ids.shape[1])
    errors, base = measure_sensitivity(ref, modules, spec, ids, copies)
    entry = {"errors": errors, "reference_perplexity": base}
    for k in ("int8", "nf4"):
        entry[f"all_{k}_perplexity"] = simulated_perplexity(ref, dict.fromkeys(modules, k), spec, ids, copies)
        log.info("auto: every module %s: perplexity %.4f (unquantized %.4f)", k, entry[f"all_{k}_perplexity"], base)
    if path is not None:
        _write(path, json.dumps(entry).encode())
    return entry, False


def _cache_path(ctx, checkpoint, policy, spec, portable: bool):
    root = cache.cache_root()
    if root is None:
        return None
    content, _ = cache.content_digest(checkpoint.files)  # the reference's key: the shards' bytes
    key = {
        "content": content,
        "side_files": cache.side_files(checkpoint.directory, checkpoint.files),
        "model": cache.model_identity(ctx.model, None),
        "policy": {"name": policy.name, "overrides": dict(policy.overrides)},
        "eval_text": cache.text_hash(quality.eval_text(None)),
        "tokens": MAX_TOKENS,
        "portable": portable,
        "numerics": cache.numerics(spec, "cpu"),
        "quantization": replace(spec, budget=None).to_json(),
        "versions": cache.library_versions(True),
        "code": cache.code_version(),
    }
    return root / "sensitivity" / f"{cache.digest(key)}.json"


def _write(path, data: bytes) -> None:
    """Atomic and best effort, like the metric cache's writes: a cache that cannot be written costs a warning."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("sensitivity cache: could not write %s (%s); measured figures not kept", path, exc)
