"""CPU and disk offload through accelerate's hooks (dispatch_model), as the plan decided.

"disk" modules are read at forward time from the checkpoint's own safetensors files (no copy, no offload
folder); "cpu" modules under a GPU move per forward, unless they hold quantized layers: those run on the CPU
and only activations cross (docs/design.md, "Loading").
"""

from __future__ import annotations

from functools import partial

import torch

from ..dtypes import dtype_name
from ..planning import Plan, TensorPlan


def _disk_params(plan: Plan) -> list[tuple[TensorPlan, TensorPlan]]:
    """(parameter, the tensor holding its bytes: itself or its tie head) for each parameter planned on disk."""
    params = (t for t in plan.tensors.values() if t.device == "disk" and t.kind == "param")
    return [(t, plan.tensors[t.tied_to] if t.tied_to else t) for t in params]


def disk_index(plan: Plan, checkpoint) -> dict[str, dict]:
    """accelerate offload index: model name -> the tensor's place in the checkpoint's files."""
    index = {}
    for t, head in _disk_params(plan):
        if head.conversion is not None:
            continue  # no single tensor in the files: assembled at forward time (_with_assembled)
        info = checkpoint.tensors[head.source]
        index[t.name] = {
            "safetensors_file": info.file,
            "weight_name": head.source,
            "dtype": dtype_name(head.dtype),
            "shape": list(head.shape),
        }
    return index


def dispatch(model: torch.nn.Module, plan: Plan, checkpoint):
    """Attach accelerate's hooks; returns the OffloadedWeightsLoader (None without offload)."""
    from accelerate import dispatch_model

    main = plan.main_device
    dm = {k: (int(v) if v.isdigit() else v) for k, v in plan.device_map.items()}
    index = disk_index(plan, checkpoint)
    _meta_as_planned(model, plan)
    if plan.runs_on_cpu:
        _dispatch_with_cpu_execution(model, dm, int(main), index)
    else:
        dispatch_model(
            model, device_map=dm, main_device=int(main) if main.isdigit() else main, offload_index=index or None
        )
    loader = _find_weights_loader(model)
    _with_assembled(loader, plan, checkpoint)
    return loader


def _meta_as_planned(model, plan: Plan) -> None:
    """Disk-planned parameters stay on meta until their module runs, but with the planned dtype (as
    from_pretrained leaves them): a forward that reads a sibling's dtype first (T5's `wo` kept in fp32 under
    bf16) must see the dtype it will get (issue 29)."""
    made: dict[str, torch.nn.Parameter] = {}
    for t, _ in _disk_params(plan):
        mod_name, _, leaf = t.name.rpartition(".")
        module = model.get_submodule(mod_name) if mod_name else model
        current = module._parameters.get(leaf)
        if current is None or current.device.type != "meta" or current.dtype == t.dtype:
            continue
        key = t.tied_to or t.name
        if key not in made:
            made[key] = torch.nn.Parameter(
                torch.empty(current.shape, dtype=t.dtype, device="meta"), requires_grad=False
            )
        module._parameters[leaf] = made[key]


class _Assembled(dict):
    """The loader's state dict, plus tensors built from several checkpoint tensors when a hook asks for them."""

    def __init__(self, base: dict, build: dict):
        super().__init__(base)
        self.build = build

    def __contains__(self, key) -> bool:
        return key in self.build or dict.__contains__(self, key)

    def __getitem__(self, key):
        return self.build[key]() if key in self.build else dict.__getitem__(self, key)


def _with_assembled(loader, plan: Plan, checkpoint) -> None:
    """Disk-planned converted tensors (fused MoE experts) read piece by piece into one tensor at forward time."""
    fused = {t.name: head for t, head in _disk_params(plan) if head.conversion}
    if not fused or loader is None:
        return
    device = loader.device if loader.device is not None else "cpu"
    loader.state_dict = _Assembled(
        loader.state_dict, {name: partial(_assemble, head, checkpoint, device) for name, head in fused.items()}
    )


def _assemble(t, checkpoint, device) -> torch.Tensor:
    from safetensors import safe_open

    from ..checkpoint.pieces import view

    target = torch.empty(t.conversion.shape, dtype=t.dtype, device=device)
    for piece in t.conversion.pieces:
        info = checkpoint.tensors[piece.source]
        with safe_open(info.file, framework="pt", device="cpu") as fh:
            view(target, piece.into).copy_(view(fh.get_tensor(piece.source), piece.take))
    return target


def _dispatch_with_cpu_execution(model, device_map: dict, main: int, index: dict) -> None:
    """dispatch_model, except that "cpu" entries execute on the CPU instead of being offloaded.

    accelerate always runs CPU-mapped modules on the main GPU; quantized weights
    cannot make that trip, so we attach the same hooks with the CPU as their
    execution device. Disk entries are streamed to the main GPU as usual.
    """
    from accelerate.hooks import attach_align_device_hook_on_blocks
    from accelerate.utils import OffloadedWeightsLoader, find_tied_parameters, retie_parameters

    execution = {name: main if dev == "disk" else dev for name, dev in device_map.items()}
    execution[""] = main
    offload = {name: dev == "disk" for name, dev in device_map.items()}
    weights_map = OffloadedWeightsLoader(index=index, device=main) if index else None
    tied = find_tied_parameters(model)
    params = [model.get_parameter(n) for group in tied for n in group]
    tied_map = {p.data_ptr(): {} for p in params if p.device.type != "meta"}
    attach_align_device_hook_on_blocks(
        model, execution_device=execution, offload=offload, weights_map=weights_map, tied_params_map=tied_map
    )
    retie_parameters(model, tied)
    model.hf_device_map = dict(device_map)


def _find_weights_loader(model):
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        wm = getattr(hook, "weights_map", None)
        if wm is not None:
            return getattr(wm, "dataset", wm)
    return None


def offloaded_bytes(loader) -> dict[str, int]:
    """Bytes held for offloaded modules: CPU copies in memory, disk tensors referenced in files."""
    out: dict[str, int] = {}
    if loader is None:
        return out
    seen = set()
    for t in loader.state_dict.values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out["cpu"] = out.get("cpu", 0) + t.numel() * t.element_size()
    files = set()
    for info in loader.index.values():
        key = (info["safetensors_file"], info["weight_name"])
        if key in files:
            continue  # tied names reference one tensor
        files.add(key)
        n = 1
        for d in info["shape"]:
            n *= d
        out["disk"] = out.get("disk", 0) + n * torch.empty((), dtype=getattr(torch, info["dtype"])).element_size()
    return out
