"""Pickle checkpoints (.bin/.pt), read only when the user opts in, only with weights_only=True.

torch.load(weights_only=True) refuses any pickle that would build something other
than tensors and plain containers (no code runs); mmap=True leaves the bytes in the
file until a tensor is used, so planning still reads no weight data.
"""

from __future__ import annotations

import pickle

import torch

from ..dtypes import SAFETENSORS_DTYPES
from ..errors import UserError
from .header import TensorInfo

_ST_NAME = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def read_pickled(files: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, TensorInfo]]:
    tensors: dict[str, torch.Tensor] = {}
    infos: dict[str, TensorInfo] = {}
    for path in files:
        state = _load(path)
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                continue
            if t.dtype not in _ST_NAME:
                raise UserError(f"{path}: tensor {name!r} has dtype {t.dtype}, which the pipeline does not load")
            tensors[name] = t
            n = t.numel() * t.element_size()
            infos[name] = TensorInfo(name, path, _ST_NAME[t.dtype], tuple(t.shape), 0, n)
    return tensors, infos


def _load(path: str) -> dict:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:160]
        raise UserError(
            f"{path}: refused by torch.load(weights_only=True) ({first}); convert it to safetensors from a trusted source"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return state
