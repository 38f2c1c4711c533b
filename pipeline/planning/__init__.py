"""Exact plans from headers alone: per-tensor dtypes and bytes, device maps, offload policy.

`build_plan` (build.py) is the entry point; nothing here reads a tensor byte.
"""

from .build import build_plan
from .plan import Plan
from .tensors import TensorPlan

__all__ = ["Plan", "TensorPlan", "build_plan"]
