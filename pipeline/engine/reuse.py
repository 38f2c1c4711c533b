"""Reuse the loaded model across sweep jobs that differ only in the int8 outlier threshold.

LLM.int8's threshold acts at forward time; the int8 weights and their scales do not depend on it. So a job
whose config equals the previous job's but for `quantization.threshold` (and the keys of stages that only
measure: stages/traits.py) keeps the loaded model, sets the new threshold and runs only the stages after the
one that loads. Within one process only, one model held at a time (docs/sweeps.md says which launchers reuse).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import shutil

from omegaconf import OmegaConf

from ..loading.hf_attributes import set_threshold
from ..quant.bnb import set_int8_thresholds
from ..stages.context import LoadContext
from ..stages.traits import traits_of

_last: dict = {}


def reuse_key(cfg, stages: list[tuple[str, object]]) -> str | None:
    """What must be equal for the loaded weights to be reusable; None when reuse cannot apply.
    `stages`: the bound (name, stage) pairs, whose traits say which loads and which only measures."""
    doc = OmegaConf.to_container(cfg, resolve=True)
    quant = doc.get("quantization") or {}
    if quant.get("method") != "int8" or not any(traits_of(s).loads_weights for _, s in stages):
        return None
    quant.pop("threshold", None)
    nodes = doc.get("stages") or {}
    for name, stage in stages:
        if traits_of(stage).measures:
            nodes.pop(name, None)
    doc.pop("name", None)
    return json.dumps(doc, sort_keys=True, default=str)


def forget() -> None:
    """Drop the held model before another one is loaded (never two models at once)."""
    _last.clear()
    gc.collect()


def remember(key: str, ctx: LoadContext, reused_stages: list[str]) -> None:
    forget()
    _last.update(key=key, ctx=ctx, stages=reused_stages)


def take(key: str | None, fresh: LoadContext) -> tuple[LoadContext, list[str]] | None:
    """The held context with this job's config, run dir, report and threshold; None if not reusable."""
    if key is None or _last.get("key") != key:
        if _last:
            forget()
        return None
    old: LoadContext = _last["ctx"]
    spec = dataclasses.replace(old.quant, threshold=fresh.quant.threshold)
    set_int8_thresholds(old.model, old.plan.int8_thresholds, spec.threshold)  # per-module overrides stay
    set_threshold(old.model, spec.threshold)
    ctx = dataclasses.replace(old, cfg=fresh.cfg, run_dir=fresh.run_dir, report=fresh.report, quant=spec, artifacts={})
    for section in ("checkpoint", "model", "plan", "load", "quantization"):
        ctx.report[section] = copy.deepcopy(old.report.get(section))
    if ctx.report.get("quantization"):
        ctx.report["quantization"]["threshold"] = spec.threshold
        ctx.report["quantization"]["reused_from"] = str(old.run_dir)
    plan_file = old.run_dir / "plan.json"
    if plan_file.exists():
        shutil.copyfile(plan_file, fresh.run_dir / "plan.json")
    return ctx, list(_last["stages"])
