"""How the run's processes share the load: one process (here) or tensor parallel (tensor.py), one object.

Stages call the strategy on `ctx.parallel` where a tensor-parallel run differs from one
process (the plan, the loaded shards, validation) and never ask which one it is; the engine
builds it from the `parallel` group (strategy_for, in __init__.py) and asks it only about the
process group, who writes the run's files, sweep reuse and a lost rank. For one process every
call is what a plain load does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from ..planning import Plan
from ..planning.device_map import resolve_caps
from ..sizes import Caps, MaxMemory


class Planned(NamedTuple):
    plan: Plan  # what this process loads
    document: dict  # sections this strategy adds to plan.json (tensor parallel: "parallel")
    report: dict  # and to report.json


class SingleProcess:
    """One process loads the whole model where the plan puts it: every call is what a plain load does."""

    writes_files = True  # report.json and the stages' artifacts
    reusable = True  # a sweep may keep the loaded model for the next job (engine/reuse.py)

    def join(self) -> None: ...  # no process group

    def lost(self, exc: BaseException) -> None: ...  # no other rank to lose

    def plan(self, build: Callable[..., Plan], *, strategy, explicit_map, max_memory: MaxMemory, **_) -> Planned:
        """`build(strategy, explicit_map, caps)` with the configured placement; caps apply unless the map is fixed."""
        caps = resolve_caps(max_memory) if strategy not in ("cpu", "explicit") or max_memory else Caps()
        return Planned(build(strategy, explicit_map, caps), {}, {})

    def loaded(self, model, plan: Plan, report: dict) -> None: ...

    def reference(self, make: Callable) -> Callable:  # the unquantized reference's maker
        return make

    def cache(self, make: Callable):  # the metric cache (measure/cache.py)
        return make()

    def validate(self, check, report: dict, **_) -> None: ...  # this process's checks are the run's
