"""Tensor parallel as the run's strategy: every rank plans all ranks, loads its shards, and validates with the others.

The stages call it where a tensor-parallel run differs from one process (parallel/strategy.py
has the single-process side): the plan (every rank's shard plan, this rank's to load), the
loaded shards (DTensors and transformers' forward hooks; every rank's load in rank 0's
report), validation (the gathered logits against the single-process model; a check holds
only if it holds on every rank).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..planning import Plan
from ..sizes import MaxMemory
from .group import all_gather, broadcast, ensure_group, lost_rank
from .hooks import distribute
from .inputs import check_inputs
from .shard_plan import plan_table, shard_plans
from .spec import ParallelSpec
from .strategy import Planned

log = logging.getLogger(__name__)


class TensorParallel:
    reusable = False  # a sweep job would need its own torchrun

    def __init__(self, spec: ParallelSpec):
        self.spec = spec

    @property
    def writes_files(self) -> bool:
        """Rank 0 writes report.json and the artifacts for all ranks (the others only their log)."""
        return self.spec.is_main

    def join(self) -> None:
        ensure_group(self.spec)

    def lost(self, exc: BaseException):
        """A collective that failed because another rank stopped answering or ended, as one line (RankLost)."""
        return lost_rank(exc, self.spec)

    def plan(self, build, *, strategy, explicit_map, max_memory: MaxMemory, checkpoint, spec, model) -> Planned:
        """Every rank's plan, this rank's to load: the whole model placed on the rank's device, then cut into
        shards; caps apply to each rank's shards (shard_plan.py), after refusing what cannot be combined."""
        par = self.spec
        placement = dict(strategy=strategy, explicit_map=explicit_map, max_memory=max_memory)
        check_inputs(par, **placement, checkpoint=checkpoint, spec=spec)
        whole = build("explicit", {"": par.device_of(par.rank)}, {})
        ranks = shard_plans(model, whole, checkpoint, par, spec, max_memory)
        log.info("tensor parallel over %d ranks (%s):\n%s", len(ranks), par.backend, plan_table(ranks))
        base = {"mode": "tensor", "world_size": par.world_size, "backend": par.backend}
        rows = [
            {"rank": r.rank, "device": r.device, "predicted_bytes": r.predicted_bytes, "read_bytes": r.read_bytes}
            for r in ranks
        ]
        document = {"parallel": {**base, "ranks": [r.to_json() for r in ranks]}}
        return Planned(ranks[par.rank].plan, document, {"parallel": {**base, "ranks": rows}})

    def loaded(self, model, plan: Plan, report: dict) -> None:
        """The shards as transformers' tensor-parallel forward expects them; every rank's load in rank 0's report."""
        distribute(model, plan, self.spec)
        load = report["load"]
        mine = {k: load[k] for k in ("seconds", "bytes_read", "peak_host_anon_bytes", "peak_gpu_bytes")}
        for rank, row in enumerate(all_gather(mine, self.spec)):
            report["parallel"]["ranks"][rank].update(row)

    def reference(self, make: Callable):
        """Only rank 0 streams the unquantized reference; the others measure without it."""
        return make if self.spec.is_main else lambda: None

    def cache(self, make: Callable):
        """None: a hit on one rank and a miss on another would part their collectives."""
        return None

    def validate(self, check, report: dict, *, measured, plan_error, forward, compare, run_dir) -> None:
        """`forward()`: the sharded logits (every rank; None when there is no forward to run); `compare(logits)`:
        against the single-process model (rank 0). Then every rank's checks merged, in rank 0's report."""
        if forward is not None:
            self._against_single_process(check, report, forward, compare, run_dir)
        self._merge_ranks(check, report, measured, plan_error)

    def _against_single_process(self, check, report: dict, forward, compare, run_dir) -> None:
        logits = forward()
        found = None
        if self.spec.is_main:
            found = compare(logits)
            if self.spec.save_logits:
                torch.save(logits, run_dir / "logits.pt")
        found = broadcast(found, self.spec)  # every rank records the same checks, so every rank exits alike
        if found.get("matches") is not None:
            why = (
                f"gathered logits differ from the single-process model by {found['max_abs_diff']:.3g} "
                f"(tolerance {found['tolerance']:g} x {found['max_abs_reference']:.3g})"
            )
            check("matches_single_process", found["matches"], why)
        report["parallel"]["logits"] = found

    def _merge_ranks(self, check, report: dict, measured: dict, plan_error: dict) -> None:
        """Every rank's checks and memory in the report; a check holds only if it holds on every rank."""
        mine = {"checks": check.results, "failures": check.failures, "measured": measured, "error": plan_error}
        rows = all_gather(mine, self.spec)
        merged = {name: all(r["checks"].get(name, True) for r in rows) for name in check.results}
        failures: dict[str, str] = {}
        for rank, row in enumerate(rows):
            entry = report["parallel"]["ranks"][rank]
            entry["measured_bytes"] = sum(row["measured"].values())
            entry["plan_error"] = max(row["error"].values(), key=abs, default=0.0)
            entry["checks_passed"] = all(row["checks"].values())
            for name, why in row["failures"].items():
                failures[name] = f"{failures[name]}; rank {rank}: {why}" if name in failures else f"rank {rank}: {why}"
        check.results, check.failures = merged, failures
