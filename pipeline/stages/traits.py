"""What a stage tells the engine about itself beyond its signature; the engine knows stages only through these.

A stage's YAML keys are its keyword parameters (engine/binding.py checks them); the few
other things the engine must know are declared beside the function with `@stage(...)`,
so the engine never names a stage and a new stage that reads weights or checks its keys
early needs no engine change. An undeclared stage (a user's own, allow_targets) has none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class StageTraits:
    # precheck(cfg, run_dir, keys): its keys checked before any stage runs (a bad value costs no load); exit 2
    precheck: Callable | None = None
    # it reads the checkpoint's tensor bytes: a run without such a stage is a dry run; a sweep that changes only
    # the int8 threshold keeps the context as it is after this stage (engine/reuse.py)
    loads_weights: bool = False
    # it only measures the loaded model: its keys are not part of what a reused model must agree on
    measures: bool = False


def stage(**traits) -> Callable:
    """Declare a stage function's traits (the function itself is returned, unchanged)."""

    def declare(fn: Callable) -> Callable:
        fn.stage_traits = StageTraits(**traits)
        return fn

    return declare


def traits_of(bound) -> StageTraits:
    """The traits of a stage function or of the partial engine/binding.py made of it."""
    found = getattr(getattr(bound, "func", bound), "stage_traits", None)
    return found if isinstance(found, StageTraits) else StageTraits()
