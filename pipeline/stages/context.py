"""The LoadContext: the state that flows through the stages.

Each stage reads what earlier stages wrote and adds its own part; stages never call
each other. `require` turns a missing earlier stage into a clear config error.

| field | written by | read by |
| --- | --- | --- |
| cfg, run_dir, report | engine (run start) | every stage; report gains a section per stage |
| parallel | engine (the strategy for the `parallel` group and torchrun's environment, before any stage) | plan, load_shards, validate |
| quant | engine (from the `quantization` group, validated before any stage); plan replaces it when the checkpoint is already quantized | plan, quantize, load_shards, validate, save, sweep reuse |
| checkpoint_path, model, model_config, tied_groups, no_split, keep_in_fp32, floating | instantiate_empty (quantize swaps layers in model; load_shards fills it) | plan, quantize, load_shards, validate, save |
| checkpoint, plan, dtype_policy | plan | quantize, load_shards, validate, save |
| loaded, offload | load_shards | validate, save |
| artifacts | any stage (plan: plan.json) | engine, which writes them into run_dir after the stage |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..checkpoint import Checkpoint
from ..dtypes import DtypePolicy
from ..errors import UserError
from ..parallel.strategy import SingleProcess
from ..planning import Plan
from ..quant.spec import QuantSpec


@dataclass
class LoadContext:
    cfg: DictConfig
    run_dir: Path
    report: dict
    quant: QuantSpec = field(default_factory=QuantSpec)
    parallel: object = field(default_factory=SingleProcess)  # one process, or parallel/tensor.py's TensorParallel
    checkpoint_path: str | None = None  # after any built-in recipe ran
    model: torch.nn.Module | None = None
    model_config: object | None = None  # transformers PretrainedConfig, when there is one
    tied_groups: list[list[str]] = field(default_factory=list)
    no_split: list[str] = field(default_factory=list)
    keep_in_fp32: list[str] = field(default_factory=list)
    floating: frozenset[str] = frozenset()  # tensors the skeleton holds as floating point (validate: still are)
    checkpoint: Checkpoint | None = None
    plan: Plan | None = None
    dtype_policy: DtypePolicy = field(default_factory=DtypePolicy)  # what quantization leaves alone is loaded in
    loaded: bool = False
    offload: object | None = None  # accelerate's OffloadedWeightsLoader when modules are offloaded
    artifacts: dict[str, dict] = field(default_factory=dict)  # run-directory file name -> JSON document

    def require(self, attr: str, stage: str, provider: str):
        value = getattr(self, attr)
        if value is None or value is False:
            raise UserError(
                f"stages: {stage} needs {provider} to run before it; add {provider} earlier in stages=[...]"
            )
        return value
