"""The state that flows through the stages, and what a run hands back.

Each stage reads what earlier stages put on the LoadContext and adds its own
part; stages never call each other. `require` turns a missing earlier stage
into a clear config error instead of an AttributeError.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UserError


@dataclass
class LoadContext:
    cfg: Any                                  # the composed DictConfig
    run_dir: Path
    report: dict
    checkpoint_path: str | None = None        # set by instantiate_empty (after any recipe ran)
    model: torch.nn.Module | None = None      # set by instantiate_empty, filled by load_shards
    model_config: Any = None                  # transformers config, when there is one
    tied_groups: list[list[str]] = field(default_factory=list)
    no_split: list[str] = field(default_factory=list)
    keep_in_fp32: list[str] = field(default_factory=list)
    checkpoint: Any = None                    # checkpoint.Checkpoint, set by plan
    plan: Any = None                          # planning.Plan, set by plan
    quantization: dict = field(default_factory=dict)   # normalised quantization config, set by plan
    dtype_policy: tuple = ("auto", {})                   # (dtype, overrides), set by plan
    loaded: bool = False                      # set by load_shards
    offload: Any = None                       # accelerate OffloadedWeightsLoader when modules are offloaded

    def require(self, attr: str, stage: str, provider: str) -> Any:
        value = getattr(self, attr)
        if value is None or value is False:
            raise UserError(
                f"stages: {stage} needs {provider} to run before it; add {provider} earlier in stages=[...]"
            )
        return value


@dataclass
class LoadResult:
    model: torch.nn.Module | None
    report: dict
    run_dir: Path

    @property
    def ok(self) -> bool:
        return self.report.get("status") == "ok"
