"""Quality metrics of a loaded model: a forward on fixed inputs, perplexity, the unquantized reference, greedy text.

Each metric is switched in pipeline/conf/stages/validate.yaml; the forward pass (on inputs built
for the model's kind, measure/inputs.py) also feeds the `forward_finite` check and always
runs. A metric that does not apply to the model (perplexity of an image classifier) is
skipped with its reason. The expensive ones (perplexity, the reference, greedy text) come
from measure/cache.py when their inputs are unchanged and the loaded weights are those they
were measured on; what each cost, and whether it came from the cache, is returned beside them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from . import progress, quality
from .cache import MetricCache
from .checks import CheckLog

log = logging.getLogger(__name__)

METRICS = ("perplexity", "reference", "greedy", "throughput", "heldout")
OFF_BY_DEFAULT = ("heldout",)  # the held-out text's perplexity: one more forward each for the model and reference
TEXTS = {"perplexity": "text", "heldout_perplexity": "heldout"}  # a figure and the _Texts attribute it is measured on


@dataclass(frozen=True)
class MetricSettings:
    wanted: dict[str, bool]
    eval_text: str | None = None
    heldout_text: str | None = None  # metrics.heldout: null is pipeline/data/heldout.txt
    max_eval_tokens: int = 512
    prompt: str = "The capital of France is"
    max_new_tokens: int = 12
    trust_remote_code: bool = False  # checkpoint.trust_remote_code: may the tokenizer be the checkpoint's own code
    portable: bool = False  # measure under portable CPU numerics (quality.measuring): int8 on the CPU, the default
    progress_interval: float = 2.0  # seconds between progress lines of a long metric (measure/progress.py)


@dataclass
class Costs:
    """Seconds per metric and whether it came from the cache (report.json `validation.metric_costs`), and what the
    cache checked before it gave any (`validation.metric_cache`: the weights' fingerprint, the shards' hash)."""

    entries: dict = field(default_factory=dict)
    cache: dict | None = None

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
    """Metrics of `model` (and the forward_finite check); `make_reference` builds the unquantized reference.

    What cannot be measured on this kind of model is skipped with its reason (check.skipped).
    """
    found: dict = {}
    costs = costs if costs is not None else Costs()
    wanted = settings.wanted
    inputs = quality.fixed_inputs(model)
    with costs.timed("forward"), quality.measuring(model, settings.portable):
        out = _forward(model, inputs, check, found, wanted["throughput"])
    if out is None:
        for name in ("perplexity", "reference", "greedy", "heldout"):
            if wanted[name]:
                check.skip(name, check.skipped.get("forward_finite") or "the forward pass failed")
        return found
    texts = _Texts(model, tokenizer_dir, check, settings)
    costs.cache = cache.report if cache is not None else None  # filled in as the cache checks
    stored = cache.get_model() if cache is not None else {}
    fresh: dict = {}
    for name, attribute in TEXTS.items():
        text = getattr(texts, attribute)
        if text is not None:
            with costs.timed(name, cached=name in stored):
                if name not in stored:
                    fresh[name] = round(texts.perplexity(model, text=text), 4)
            found[name] = stored.get(name, fresh.get(name))
    if wanted["reference"]:
        reference = _Reference(inputs.kwargs, out, texts, cache if quantized else None)
        with costs.timed("reference", cached=reference.cached):
            compared = reference.compare(model, quantized, make_reference, reference_dtype, found)
        if compared:
            found.update(compared)
        else:
            check.skip("reference", "no unquantized reference: it streams unquantized safetensors weights")
    if texts.has_tokenizer and wanted["greedy"]:
        if settings.max_new_tokens:
            with costs.timed("greedy", cached="continuation" in stored):
                if "continuation" not in stored:
                    fresh["continuation"] = texts.greedy(model)
            found["prompt"] = settings.prompt
            found["continuation"] = stored.get("continuation", fresh.get("continuation"))
        else:
            check.skip("greedy", "stages.validate.max_new_tokens is 0")
    if cache is not None and fresh:
        cache.put_model({**stored, **fresh})
    return found


def _forward(model, inputs, check: CheckLog, found: dict, throughput: bool) -> torch.Tensor | None:
    """The forward pass on the fixed inputs, feeding forward_finite; None when it could not give an output."""
    if inputs.kwargs is None:
        check.skip("forward_finite", inputs.why)
        return None
    try:
        out, seconds = quality.forward_output(model, inputs.kwargs)
        finite, why = bool(torch.isfinite(out).all()), "the forward pass gave NaN/Inf"
    except RuntimeError as exc:  # e.g. dtype overrides that the model's code cannot mix
        out, seconds, finite, why = None, 0.0, False, f"the forward pass raised {str(exc).splitlines()[0][:200]}"
    except (ValueError, TypeError) as exc:  # the model's own input validation refused the fixed inputs
        check.skip(
            "forward_finite", f"{type(model).__name__} refused the fixed inputs: {str(exc).splitlines()[0][:200]}"
        )
        return None
    check("forward_finite", finite, why)
    if throughput and out is not None:
        if inputs.tokens:
            found["forward_tokens_per_s"] = round(inputs.tokens / max(seconds, 1e-9), 1)
        else:
            found["forward_passes_per_s"] = round(1 / max(seconds, 1e-9), 2)
    return out


class _Texts:
    """The tokenizer and evaluation text, loaded only when a metric is measured (not on a cache hit);
    the text metrics are skipped with their reason when the model is not a causal LM, has no tokenizer,
    or its tokenizer is the checkpoint's own code and checkpoint.trust_remote_code is false."""

    def __init__(self, model, tokenizer_dir: str, check: CheckLog, settings: MetricSettings):
        self.settings = settings
        self._dir = tokenizer_dir
        self._tokenizer = None
        why = "" if quality.is_causal_lm(model) else f"{type(model).__name__} is not a causal LM"
        if not why and not quality.has_tokenizer(tokenizer_dir):
            why = "the checkpoint directory has no tokenizer"
        why = why or self._untrusted_code()
        self.has_tokenizer = not why
        if why:
            for name in ("perplexity", "greedy", "heldout"):
                if settings.wanted[name]:
                    check.skip(name, why)
        wanted = settings.wanted if self.has_tokenizer else {}
        self.text = quality.eval_text(settings.eval_text) if wanted.get("perplexity") else None
        self.heldout = quality.eval_text(settings.heldout_text, "heldout.txt") if wanted.get("heldout") else None

    def _untrusted_code(self) -> str:
        """Why the tokenizer is not used: its files name the checkpoint's own code, not trusted, and transformers
        has no class of its own for it ('' when it can be used: trusted, or transformers' class, as
        from_pretrained(trust_remote_code=False) does). Nothing from the checkpoint is imported."""
        code = quality.tokenizer_code(self._dir)
        if not code or self.settings.trust_remote_code:
            return ""
        try:
            self._tokenizer = quality.load_tokenizer(self._dir, trust_remote_code=False)
        except (ValueError, OSError, KeyError, ImportError, AttributeError, TypeError):
            why = (
                f"the tokenizer is the checkpoint's own code ({code}); set checkpoint.trust_remote_code=true to run it"
            )
            log.warning("perplexity and greedy text skipped: %s", why)
            return why
        log.warning("%s: using transformers' %s (set checkpoint.trust_remote_code=true for the checkpoint's code)",
                    code, type(self._tokenizer).__name__)  # fmt: skip
        return ""

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = quality.load_tokenizer(self._dir, self.settings.trust_remote_code)
        return self._tokenizer

    def perplexity(self, model, counted: bool = True, text: str | None = None) -> float:
        """Perplexity on `text` (the evaluation text when None); its progress in layers unless the caller counts it
        (the reference)."""
        tokenizer = self.tokenizer  # loaded outside the measurement's numerics
        shown = progress.layers(model, "perplexity", self.settings.progress_interval) if counted else nullcontext()
        with shown, quality.measuring(model, self.settings.portable):
            return quality.perplexity(model, tokenizer, text or self.text, self.settings.max_eval_tokens)

    def greedy(self, model) -> str:
        tokenizer = self.tokenizer
        settings = self.settings
        shown = progress.tokens(model, "greedy", settings.progress_interval, settings.max_new_tokens)
        with shown, quality.measuring(model, settings.portable):
            return quality.greedy(model, tokenizer, settings.prompt, settings.max_new_tokens)


@dataclass
class _Reference:
    inputs: dict
    out: torch.Tensor
    texts: _Texts
    cache: MetricCache | None

    def __post_init__(self):
        self.entry = self.cache.get_reference(self.out.shape) if self.cache is not None else None
        wanted = [name for name, attribute in TEXTS.items() if getattr(self.texts, attribute) is not None]
        if self.entry is not None and any(name not in self.entry for name in wanted):
            self.entry = None  # stored without a perplexity now asked for (it was off): measure again
        self.cached = self.entry is not None

    def compare(self, model, quantized: bool, make_reference, reference_dtype: str, measured: dict) -> dict:
        """The reference's figures beside the loaded model's `measured` ones (its own when it is unquantized)."""
        if not quantized:
            found = {"reference": "the loaded model is unquantized: it is its own reference"}
            found |= {f"reference_{name}": measured[name] for name in TEXTS if measured.get(name) is not None}
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
        for name, attribute in TEXTS.items():
            if getattr(self.texts, attribute) is not None:
                found[f"reference_{name}"] = entry[name]
        return found

    def _measure(self, make_reference) -> dict | None:
        ref = make_reference()
        if ref is None:
            return None
        settings = self.texts.settings
        texts = {name: getattr(self.texts, attribute) for name, attribute in TEXTS.items()}
        texts = {name: text for name, text in texts.items() if text is not None}
        # one count over every forward: the logits on the fixed inputs, then each text
        with progress.layers(ref, "reference", settings.progress_interval, forwards=1 + len(texts)):
            with quality.measuring(ref, settings.portable):
                ref_out, _ = quality.forward_output(ref, self.inputs)
            entry = {"logits": ref_out}
            for name, text in texts.items():
                entry[name] = round(self.texts.perplexity(ref, counted=False, text=text), 4)
        if self.cache is not None:
            self.cache.put_reference(entry)
        return entry
