"""The unquantized reference model, streamed from the checkpoint layer by layer.

Quality metrics compare the loaded model with the same checkpoint unquantized.
Holding both would double the memory, so the reference keeps every weight on
"disk": accelerate's offload hooks read each module's weights from the shards
(in place, cast to the planned dtype) just before the module runs and drop them
after, so at most one layer of the reference is in memory at a time. It costs
one extra read of the checkpoint (from the page cache, usually) per forward.
"""
from __future__ import annotations

import logging

import torch

from accelerate import init_empty_weights

from .context import LoadContext
from .offload import dispatch
from .stages.instantiate_empty import build_from_config
from .planning import Plan, assign_devices, plan_tensors
from .quality import input_device


def streamed_reference(ctx: LoadContext):
    """A reference model whose weights stay in the checkpoint files; None when it cannot be built."""
    model = ctx.model
    config = getattr(model, "config", None)
    if config is None or ctx.plan.missing or ctx.checkpoint.format != "safetensors" or ctx.quantization.get("prequantized"):
        return None  # the reference streams unquantized weights from safetensors files in place
    cls = type(model)
    with init_empty_weights(include_buffers=False):
        ref = build_from_config(cls, config)
    if hasattr(ref, "tie_weights"):
        ref.tie_weights()
    ref.eval()
    dtype, overrides = ctx.dtype_policy
    tensors, key_map, unexpected, missing, dups = plan_tensors(
        ref, ctx.checkpoint, dtype=dtype, overrides=overrides, keep_in_fp32=ctx.keep_in_fp32,
        tied_groups=ctx.tied_groups, quantized_modules=[])
    for t in tensors.values():  # offload hooks cast each weight to its meta tensor's dtype: make that the planned one
        if t.kind == "param" and not t.tied_to:
            mod_name, _, leaf = t.name.rpartition(".")
            module = ref.get_submodule(mod_name) if mod_name else ref
            module._parameters[leaf] = torch.nn.Parameter(torch.empty(t.shape, dtype=t.dtype, device="meta"),
                                                          requires_grad=False)
    if hasattr(ref, "tie_weights"):
        ref.tie_weights()
    main = input_device(model)
    main_key = str(main.index or 0) if main.type == "cuda" else "cpu"
    assign_devices(tensors, {"": "disk"})
    for t in tensors.values():
        if t.kind == "buffer":
            t.device = main_key  # accelerate keeps buffers on the execution device
    plan = Plan("reference", {}, {"": "disk"}, tensors, key_map, unexpected, missing, dups)
    for module in ref.modules():
        for leaf, buf in module._buffers.items():
            if buf is not None:
                module._buffers[leaf] = buf.to(main)
    quiet = logging.getLogger("accelerate.big_modeling")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "parameters on the meta device because offloaded": that is the point here
    try:
        dispatch(ref, plan, ctx.checkpoint)
    finally:
        quiet.setLevel(level)
    return ref
