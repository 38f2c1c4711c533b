"""The number a sweeper optimises: memory, as long as quality stays within a bound.

`sweep_objective` in the config (see pipeline/conf/sweep/optuna_memory.yaml):
  minimize: gib                   # total bytes of the loaded model over all devices, in GiB
  max_perplexity_ratio: 1.03      # perplexity / unquantized reference perplexity must stay below
  max_logits_rel_error: 0.05      # and/or the logits' relative error against the reference
A run that fails, or misses a bound, scores PENALTY plus how far it missed, so the
sweeper still learns which way is better.
"""

from __future__ import annotations

PENALTY = 1e6


def objective(report: dict, spec: dict) -> float:
    if report.get("status") != "ok":
        return PENALTY * 2
    validation = report.get("validation") or {}
    metrics = validation.get("metrics") or {}
    miss = 0.0
    ratio_bound = spec.get("max_perplexity_ratio")
    if ratio_bound is not None:
        ppl, ref = metrics.get("perplexity"), metrics.get("reference_perplexity")
        if ppl is None or not ref:
            return PENALTY * 2
        miss += max(0.0, ppl / ref - float(ratio_bound))
    err_bound = spec.get("max_logits_rel_error")
    if err_bound is not None:
        err = metrics.get("logits_rel_error")
        if err is None:
            return PENALTY * 2
        miss += max(0.0, err - float(err_bound))
    if miss > 0:
        return PENALTY + miss
    return sum((validation.get("measured_bytes") or {}).values()) / 2**30
