"""The unquantized reference model, streamed from the checkpoint layer by layer.

Planned (build_plan, as any load) with every weight on "disk", so accelerate's offload hooks read each
module's weights from the shards just before it runs and at most one layer is in memory: the price is one
extra read of the checkpoint per forward (docs/design.md, "The unquantized reference").
"""

from __future__ import annotations

import logging

from accelerate import init_empty_weights

from ..dtypes import DtypePolicy
from ..loading.offload import dispatch
from ..loading.skeleton import build_from_config
from ..planning import Plan, build_plan
from ..quant.spec import QuantSpec
from ..quant.targets import QuantSelection
from .memory import device_str
from .quality import input_device


def streamed_reference(
    model, checkpoint, plan: Plan, policy: DtypePolicy, spec: QuantSpec, *, tied_groups, keep_in_fp32, no_split
):
    """A reference for the loaded `model` whose weights stay in the checkpoint files; None when there is none."""
    config = getattr(model, "config", None)
    if config is None or plan.missing or checkpoint.format != "safetensors" or spec.prequantized:
        return None  # the reference streams unquantized weights from safetensors files in place
    with init_empty_weights(include_buffers=False):
        ref = build_from_config(type(model), config)
    if hasattr(ref, "tie_weights"):
        ref.tie_weights()
    ref.eval()
    main = input_device(model)
    ref_plan = build_plan(
        ref,
        checkpoint,
        policy=policy,
        spec=QuantSpec(),
        selection=QuantSelection([]),
        tied_groups=tied_groups,
        keep_in_fp32=keep_in_fp32,
        no_split=no_split,
        strategy="explicit",
        explicit_map={"": "disk"},
        max_memory={},
        main_device=device_str(main),
        assemble_from_disk=True,
    )
    for module in ref.modules():
        for leaf, buf in module._buffers.items():
            if buf is not None:
                module._buffers[leaf] = buf.to(main)
    quiet = logging.getLogger("accelerate.big_modeling")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "parameters on the meta device because offloaded": that is the point here
    try:
        dispatch(ref, ref_plan, checkpoint)
    finally:
        quiet.setLevel(level)
    return ref
