"""Quality metrics of a loaded model: a forward on fixed tokens, perplexity, the unquantized reference, greedy text.

Each metric is switched in conf/stages/validate.yaml; the forward pass also feeds
the `forward_finite` check.
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
    """Metrics of `model` (and the forward_finite check); `make_reference` builds the unquantized reference."""
    found: dict = {}
    wanted = settings.wanted
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
        return found
    tokenizer = quality.load_tokenizer(tokenizer_dir) if quality.is_causal_lm(model) else None
    text = quality.eval_text(settings.eval_text) if tokenizer is not None and wanted["perplexity"] else None
    if text is not None:
        found["perplexity"] = round(quality.perplexity(model, tokenizer, text, settings.max_eval_tokens), 4)
    if wanted["reference"]:
        reference = _Reference(inputs, out, tokenizer, text, settings.max_eval_tokens)
        found.update(reference.compare(model, quantized, make_reference, reference_dtype, found.get("perplexity")))
    if tokenizer is not None and wanted["greedy"] and settings.max_new_tokens:
        found["prompt"] = settings.prompt
        found["continuation"] = quality.greedy(model, tokenizer, settings.prompt, settings.max_new_tokens)
    return found


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
