"""The Plan: every tensor's device, dtype and bytes, the device map, and what the checkpoint lacks or adds.

Built once by planning/build.py (keywords only) and never changed after; later
stages and validate read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..names import owner
from ..sizes import device_order
from . import offload_policy
from .tensors import TensorPlan


@dataclass(frozen=True)
class Plan:
    strategy: str
    max_memory: dict[str, int]  # the resolved caps it was checked against (plan.json's max_memory)
    device_map: dict[str, str]
    tensors: dict[str, TensorPlan]
    key_map: dict[str, str]  # checkpoint key -> model name
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    # the load initialises the missing tensors (checkpoint.allow_missing, or all are ones transformers initialises itself)
    missing_allowed: bool = False
    tied_duplicates: list[str] = field(default_factory=list)  # checkpoint keys of tied copies, not loaded again
    quantized_modules: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module -> why it is not quantized
    int8_thresholds: dict[str, float] = field(default_factory=dict)  # per-module overrides of the threshold
    warnings: list[str] = field(default_factory=list)
    # pre-quantized checkpoints: weight name -> {stat name: checkpoint key} (int8 SCB, 4-bit absmax, quant_state...)
    saved_stats: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def predicted_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.device] = out.get(t.device, 0) + t.nbytes
        return dict(sorted(out.items(), key=lambda kv: device_order(kv[0])))

    @property
    def devices(self) -> list[str]:
        return list(self.predicted_bytes)

    @property
    def main_device(self) -> str:
        return offload_policy.main_device(self.devices)

    @property
    def runs_on_cpu(self) -> bool:
        return offload_policy.runs_on_cpu(self.tensors, self.quantized_modules, self.main_device)

    @property
    def needs_dispatch(self) -> bool:
        return offload_policy.needs_dispatch(self.devices)

    def module_bytes(self) -> dict[str, int]:
        """Bytes under each device_map entry (the units the planner placed)."""
        out = dict.fromkeys(self.device_map, 0)
        for t in self.tensors.values():
            unit = owner(t.name, {k: k for k in out})
            if unit is not None:
                out[unit] += t.nbytes
        return out
