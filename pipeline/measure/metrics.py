"""Quality metrics of a loaded model: a forward on fixed tokens, perplexity, the unquantized reference, greedy text.

Each metric is switched in conf/stages/validate.yaml; the forward pass also feeds
the `forward_finite` check and always runs. The expensive ones (perplexity, the
reference, greedy text) come from measure/cache.py when their inputs are unchanged;
what each cost, and whether it came from the cache, is returned beside them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from . import quality
from .cache import MetricCache
from .checks import CheckLog

METRICS = ("perplexity", "reference", "greedy", "throughput")


@dataclass(frozen=True)
class MetricSettings:
    wanted: dict[str, bool]
    eval_text: str | None = None
    max_eval_tokens: int = 512
    prompt: str = "The capital of France is"
    max_new_tokens: int = 12


@dataclass
class Costs:
    """Seconds per metric and whether it came from the cache (report.json `validation.metric_costs`)."""

    entries: dict = field(default_factory=dict)

    @contextmanager
    def timed(self, name: str, cached: bool = False):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.entries[name] = {"seconds": round(time.perf_counter() - start, 4), "cached": cached}


def measure_quality(
    model,
    tokenizer_dir: str,
    check: CheckLog,
    settings: MetricSettings,
    *,
    quantized: bool,
    make_reference: Callable[[], torch.nn.Module | None],
    reference_dtype: str,
    cache: MetricCache | None = None,
    costs: Costs | None = None,
) -> dict:
    """Metrics of `model` (and the forward_finite check); `make_reference` builds the unquantized reference."""
    found: dict = {}
    costs = costs if costs is not None else Costs()
    wanted = settings.wanted
    inputs = quality.fixed_inputs(model)
    with costs.timed("forward"):
        try:
            out, tps = quality.forward_output(model, inputs)
            finite, why = bool(torch.isfinite(out).all()), "the forward pass gave NaN/Inf"
        except RuntimeError as exc:  # e.g. dtype overrides that the model's code cannot mix
            out, tps, finite, why = None, 0.0, False, f"the forward pass raised {str(exc).splitlines()[0][:200]}"
    check("forward_finite", finite, why)
    if wanted["throughput"]:
        found["forward_tokens_per_s"] = round(tps, 1)
    if out is None:
        return found
    texts = _Texts(model, tokenizer_dir, settings)
    stored = cache.get_model() if cache is not None else {}
    fresh: dict = {}
    if wanted["perplexity"] and texts.has_tokenizer:
        with costs.timed("perplexity", cached="perplexity" in stored):
            if "perplexity" not in stored:
                fresh["perplexity"] = round(texts.perplexity(model), 4)
        found["perplexity"] = stored.get("perplexity", fresh.get("perplexity"))
    if wanted["reference"]:
        reference = _Reference(inputs, out, texts, cache)
        with costs.timed("reference", cached=reference.cached):
            found.update(reference.compare(model, quantized, make_reference, reference_dtype, found.get("perplexity")))
    if texts.has_tokenizer and wanted["greedy"] and settings.max_new_tokens:
        with costs.timed("greedy", cached="continuation" in stored):
            if "continuation" not in stored:
                fresh["continuation"] = quality.greedy(model, texts.tokenizer, settings.prompt, settings.max_new_tokens)
        found["prompt"] = settings.prompt
        found["continuation"] = stored.get("continuation", fresh.get("continuation"))
    if cache is not None and fresh:
        cache.put_model({**stored, **fresh})
    return found


class _Texts:
    """The tokenizer and evaluation text, loaded only when a metric is measured (not on a cache hit)."""

    def __init__(self, model, tokenizer_dir: str, settings: MetricSettings):
        self.settings = settings
        self._dir = tokenizer_dir
        self._tokenizer = None
        self.has_tokenizer = quality.is_causal_lm(model) and _has_tokenizer(tokenizer_dir)
        self.text = (
            quality.eval_text(settings.eval_text) if self.has_tokenizer and settings.wanted["perplexity"] else None
        )

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = quality.load_tokenizer(self._dir)
        return self._tokenizer

    def perplexity(self, model) -> float:
        return quality.perplexity(model, self.tokenizer, self.text, self.settings.max_eval_tokens)


def _has_tokenizer(root: str) -> bool:
    """What quality.load_tokenizer looks for, without importing the tokenizer code."""
    return any(os.path.exists(os.path.join(root, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


@dataclass
class _Reference:
    inputs: dict
    out: torch.Tensor
    texts: _Texts
    cache: MetricCache | None

    def __post_init__(self):
        self.entry = self.cache.get_reference() if self.cache is not None else None
        if self.entry is not None and self.texts.text is not None and "perplexity" not in self.entry:
            self.entry = None  # stored without perplexity (it was off): measure again
        self.cached = self.entry is not None

    def compare(self, model, quantized: bool, make_reference, reference_dtype: str, perplexity) -> dict:
        if not quantized:
            found = {"reference": "the loaded model is unquantized: it is its own reference"}
            if perplexity is not None:
                found["reference_perplexity"] = perplexity
            found["logits_rel_error"] = 0.0
            return found
        entry = self.entry if self.entry is not None else self._measure(make_reference)
        if entry is None:
            return {}
        ref_out = entry["logits"]
        found = {
            "reference": "unquantized, streamed layer by layer from the checkpoint",
            "reference_dtype": reference_dtype,  # the dtype policy of everything quantization leaves alone
            "logits_rel_error": round(quality.relative_error(self.out, ref_out), 6),
        }
        if not quality.is_causal_lm(model):
            found["output_cosine_to_reference"] = round(quality.mean_cosine(self.out, ref_out), 6)
        if self.texts.text is not None:
            found["reference_perplexity"] = entry["perplexity"]
        return found

    def _measure(self, make_reference) -> dict | None:
        ref = make_reference()
        if ref is None:
            return None
        ref_out, _ = quality.forward_output(ref, self.inputs)
        entry = {"logits": ref_out}
        if self.texts.text is not None:
            entry["perplexity"] = round(self.texts.perplexity(ref), 4)
        if self.cache is not None:
            self.cache.put_reference(entry)
        return entry
