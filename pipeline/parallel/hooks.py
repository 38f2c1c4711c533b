"""The sharded forward: transformers' own tensor-parallel styles, installed on the loaded shards.

Each style's `install_forward` (reached through hf/tensor_parallel.py) wraps the module's forward with its
collectives; what we do ourselves is put the weights in: the shards this rank read become the DTensor that the
style's `shard_param` makes of a meta weight, placement checked against the plan's dim. int8 weights stay plain
local `Int8Params` (bitsandbytes cannot hold a DTensor). docs/design.md, "Tensor parallel: what is
transformers' and what is ours".
"""

from __future__ import annotations

import torch

from ..errors import PipelineError
from ..hf.tensor_parallel import install_style, model_plan, style_placement
from ..loading.assign import tie
from ..planning import Plan
from .group import mesh as device_mesh
from .spec import ParallelSpec


def distribute(model: torch.nn.Module, plan: Plan, parallel: ParallelSpec) -> None:
    """Wrap this rank's loaded shards as DTensors and install the model's tensor-parallel forward hooks."""
    mesh = device_mesh(parallel)
    styles = model_plan(model)
    modules = dict(model.named_modules())
    for t in plan.tensors.values():
        if t.slice is None or t.tied_to or t.quantized:
            continue
        mod_name, _, leaf = t.name.rpartition(".")
        module = modules[mod_name]
        placement = _placement(t.slice.style, module, leaf, t, mesh)
        _wrap(module, leaf, placement, t, mesh)
    tie(model, plan.tensors)  # tied members point at their head again (the head was just re-wrapped)
    for name, style in styles.items():
        module = modules.get(name)
        if module is None:
            continue  # a parameter entry: its shard is in place already
        install_style(model, module, style, mesh)


def _placement(style, module, leaf: str, t, mesh):
    """The placement transformers' style gives this parameter (it shards a meta copy); must match our plan."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    loaded = module._parameters[leaf]
    module._parameters[leaf] = torch.nn.Parameter(
        torch.empty(t.slice.full_shape, dtype=loaded.dtype, device="meta"), requires_grad=False
    )
    try:
        placement = style_placement(style, module, leaf, mesh)
    finally:
        module._parameters[leaf] = loaded
    ndim = len(t.slice.full_shape)
    packed = getattr(placement, "split_factor", 1)  # _StridedShard: packed blocks cut alike
    if (
        not isinstance(placement, (Shard, _StridedShard))
        or placement.dim % ndim != t.slice.dim
        or packed != t.slice.packed
    ):
        raise PipelineError(
            f"{t.name}: transformers places it as {placement}, our plan sharded dim {t.slice.dim} "
            f"in {t.slice.packed} block(s)"
        )
    return placement


def _wrap(module, leaf: str, placement, t, mesh) -> None:
    from torch.distributed.tensor import DTensor

    local = module._parameters[leaf].data
    full = t.slice.full_shape
    stride = torch.empty(full, device="meta").stride()
    value = DTensor.from_local(local, mesh, [placement], run_check=False, shape=full, stride=stride)
    module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
