"""What a run hands back: the model, the report.json dict and the run directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class LoadResult:
    model: torch.nn.Module | None
    report: dict
    run_dir: Path

    @property
    def ok(self) -> bool:
        return self.report.get("status") == "ok"
