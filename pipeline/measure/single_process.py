"""Tensor parallel: do the sharded model's (gathered) logits equal the single-process model's?

The single-process model is the streamed reference (measure/reference.py), so no rank ever holds the whole
model; every rank runs the sharded forward (it has collectives), only the rank that asks builds the
reference. Unquantized: checked against `tolerance` (the rowwise partial sums differ only in order); int8:
compared with the unquantized reference and reported, no bar (docs/parallel.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import quality


def sharded_logits(model, portable: bool = False) -> torch.Tensor:
    """The fixed-token forward of the sharded model (run it on every rank), under validate's numerics."""
    inputs = quality.fixed_inputs(model).kwargs
    with quality.measuring(model, portable):
        out, _ = quality.forward_output(model, inputs)
    return out


def compare(
    logits: torch.Tensor,
    make_reference: Callable[[], torch.nn.Module | None],
    model,
    *,
    quantized: bool,
    tolerance: float,
    known_error: float | None = None,
    portable: bool = False,
) -> dict:
    """Max and relative difference to the single-process reference; `matches` is None when there is no bar.

    `known_error`: an int8 load's logits error that the quality metrics already measured against the
    same reference (validation.metrics.logits_rel_error): used as is, not streamed a second time.
    """
    if quantized and known_error is not None:
        return {"reference": "single process, unquantized", "relative_error": known_error, "matches": None}
    ref = make_reference()
    if ref is None:
        return {"reference": "none (pickle, saved-quantized or incomplete checkpoint)"}
    with quality.measuring(ref, portable):
        ref_out, _ = quality.forward_output(ref, quality.fixed_inputs(model).kwargs)
    diff = (logits - ref_out).abs().max().item()
    scale = ref_out.abs().max().item()
    found = {
        "reference": "single process, unquantized" if quantized else "single process, same dtypes",
        "max_abs_diff": diff,
        "max_abs_reference": scale,
        "relative_error": round(quality.relative_error(logits, ref_out), 9),
        "tolerance": None if quantized else tolerance,
        "matches": None if quantized else diff <= tolerance * scale,
    }
    return found
