"""Tensor parallel over torchrun's processes: who this rank is, the shard plan, the process group, the forward hooks.

spec.py (ParallelSpec: rank/world discovery, validated at run start), inputs.py (what
cannot be combined with it, refused at plan time), shard_plan.py (each rank's exact plan:
local shapes, bytes, byte ranges to read), group.py (torch.distributed), hooks.py
(transformers' forward machinery on the loaded shards), launch.py (one run directory
for all ranks). The model's own tensor-parallel plan and styles are read through hf/tensor_parallel.py.
"""

from .spec import ParallelSpec

__all__ = ["ParallelSpec"]
