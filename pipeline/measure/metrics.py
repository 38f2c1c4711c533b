"""Quality metrics of a loaded model: a forward on fixed inputs, perplexity, the unquantized reference, greedy text.

Each metric is switched in conf/stages/validate.yaml; the forward pass (on inputs built
for the model's kind, measure/inputs.py) also feeds the `forward_finite` check. A metric
that does not apply to the model (perplexity of an image classifier) is skipped with its reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import quality
from .checks import CheckLog

METRICS = ("perplexity", "reference", "greedy", "throughput")


@dataclass(frozen=True)
class MetricSettings:
    wanted: dict[str, bool]
    eval_text: str | None = None
    max_eval_tokens: int = 512
    prompt: str = "The capital of France is"
    max_new_tokens: int = 12


def measure_quality(
    model,
    tokenizer_dir: str,
    check: CheckLog,
    settings: MetricSettings,
    *,
    quantized: bool,
    make_reference: Callable[[], torch.nn.Module | None],
    reference_dtype: str,
) -> dict:
    """Metrics of `model` (and the forward_finite check); `make_reference` builds the unquantized reference.

    What cannot be measured on this kind of model is skipped with its reason (check.skipped).
    """
    found: dict = {}
    wanted = settings.wanted
    inputs = quality.fixed_inputs(model)
    out = _forward(model, inputs, check, found, wanted["throughput"])
    if out is None:
        for name in ("perplexity", "reference", "greedy"):
            if wanted[name]:
                check.skip(name, check.skipped.get("forward_finite") or "the forward pass failed")
        return found
    tokenizer = _tokenizer(model, tokenizer_dir, check, settings)
    text = quality.eval_text(settings.eval_text) if tokenizer is not None and wanted["perplexity"] else None
    if text is not None:
        found["perplexity"] = round(quality.perplexity(model, tokenizer, text, settings.max_eval_tokens), 4)
    if wanted["reference"]:
        reference = _Reference(inputs.kwargs, out, tokenizer, text, settings.max_eval_tokens)
        compared = reference.compare(model, quantized, make_reference, reference_dtype, found.get("perplexity"))
        if compared:
            found.update(compared)
        else:
            check.skip("reference", "no unquantized reference: it streams unquantized safetensors weights")
    if tokenizer is not None and wanted["greedy"]:
        if settings.max_new_tokens:
            found["prompt"] = settings.prompt
            found["continuation"] = quality.greedy(model, tokenizer, settings.prompt, settings.max_new_tokens)
        else:
            check.skip("greedy", "stages.validate.max_new_tokens is 0")
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


def _tokenizer(model, tokenizer_dir: str, check: CheckLog, settings: MetricSettings):
    """The checkpoint's tokenizer for the text metrics, or None with the reason they are skipped."""
    causal = quality.is_causal_lm(model)
    tokenizer = quality.load_tokenizer(tokenizer_dir) if causal else None
    if tokenizer is None:
        why = "the checkpoint directory has no tokenizer" if causal else f"{type(model).__name__} is not a causal LM"
        for name in ("perplexity", "greedy"):
            if settings.wanted[name]:
                check.skip(name, why)
    return tokenizer


@dataclass
class _Reference:
    inputs: dict
    out: torch.Tensor
    tokenizer: object
    text: str | None
    max_eval_tokens: int

    def compare(self, model, quantized: bool, make_reference, reference_dtype: str, perplexity) -> dict:
        if not quantized:
            found = {"reference": "the loaded model is unquantized: it is its own reference"}
            if perplexity is not None:
                found["reference_perplexity"] = perplexity
            found["logits_rel_error"] = 0.0
            return found
        ref = make_reference()
        if ref is None:
            return {}
        ref_out, _ = quality.forward_output(ref, self.inputs)
        found = {
            "reference": "unquantized, streamed layer by layer from the checkpoint",
            "reference_dtype": reference_dtype,  # the dtype policy of everything quantization leaves alone
            "logits_rel_error": round(quality.relative_error(self.out, ref_out), 6),
        }
        if not quality.is_causal_lm(model):
            found["output_cosine_to_reference"] = round(quality.mean_cosine(self.out, ref_out), 6)
        if self.text is not None:
            found["reference_perplexity"] = round(
                quality.perplexity(ref, self.tokenizer, self.text, self.max_eval_tokens), 4
            )
        return found
