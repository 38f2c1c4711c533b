"""Tensor parallel over torchrun's processes: who this rank is, the shard plan, the process group, the forward hooks.

strategy.py (what stages call: one process, or tensor.py's TensorParallel), spec.py
(ParallelSpec: rank/world discovery, validated at run start), inputs.py (what cannot be
combined with it, refused at plan time), shard_plan.py (each rank's exact plan: local
shapes, bytes, byte ranges to read), group.py (torch.distributed, and how a rank's process
ends), hooks.py (transformers' forward machinery on the loaded shards), launch.py (one run
directory for all ranks). The model's own tensor-parallel plan and styles are read through
hf/tensor_parallel.py.
"""

from .spec import ParallelSpec
from .strategy import SingleProcess


def strategy_for(spec: ParallelSpec):
    """What the stages call for a checked `parallel` spec (tensor.py, and torch.distributed, only for tensor)."""
    if not spec.enabled:
        return SingleProcess()
    from .tensor import TensorParallel

    return TensorParallel(spec)


__all__ = ["ParallelSpec", "SingleProcess", "strategy_for"]
