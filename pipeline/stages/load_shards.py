"""Stage 4: stream every checkpoint tensor to its planned device and dtype.

Shards are read one tensor at a time through safetensors' memory map, in file
order, so host memory holds at most one tensor in flight, never the whole
checkpoint. int8 weights are quantized by bitsandbytes on their target device
as they arrive. Missing and unexpected keys are reported by name.
"""
from __future__ import annotations

import logging
import sys
import time

import torch
from safetensors import safe_open

from ..bnb import import_bitsandbytes
from ..context import LoadContext
from ..errors import UserError
from ..memory_probe import PeakAnonSampler
from ..offload import dispatch, needs_dispatch
from ..planning import TensorPlan

log = logging.getLogger(__name__)


def load_shards(ctx: LoadContext, *, progress: bool | None = None) -> None:
    plan = ctx.require("plan", "load_shards", "plan")
    model = ctx.model
    devices = {dev: _torch_device(dev) for dev in plan.devices if dev != "disk"}
    # Disk-planned tensors are not read now: accelerate reads them from the shards at forward time.
    by_source = {t.source: t for t in plan.tensors.values() if t.source and t.device != "disk"}
    total = sum(ctx.checkpoint.tensors[k].nbytes for k in by_source)
    for dev in devices.values():
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
    bar = _progress_bar(total, progress)
    bytes_read = 0
    start = time.perf_counter()
    with PeakAnonSampler() as sampler:
        for path in ctx.checkpoint.files:
            infos = sorted((i for i in ctx.checkpoint.tensors.values() if i.file == path), key=lambda i: i.start)
            with safe_open(path, framework="pt", device="cpu") as fh:
                for info in infos:
                    t = by_source.get(info.name)
                    if t is None:
                        continue  # unexpected or a tied duplicate: never read
                    _place(model, t, fh.get_tensor(info.name), devices[t.device])
                    bytes_read += info.nbytes
                    if bar is not None:
                        bar.update(info.nbytes)
        _finish_skeleton_tensors(model, plan.tensors, devices)
        _tie(model, plan.tensors)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    model.hf_device_map = dict(plan.device_map)
    if needs_dispatch(plan):
        ctx.offload = dispatch(model, plan, ctx.checkpoint)
    ctx.loaded = True
    ctx.report["load"] = {
        "seconds": round(seconds, 4),
        "bytes_read": bytes_read,
        "gb_per_s": round(bytes_read / seconds / 1e9, 3) if seconds > 0 else 0.0,
        "baseline_host_anon_bytes": sampler.baseline,
        "peak_host_anon_bytes": sampler.peak,
        "peak_gpu_bytes": {str(d.index): torch.cuda.max_memory_allocated(d) for d in devices.values() if d.type == "cuda"},
        "missing_keys": plan.missing,
        "unexpected_keys": plan.unexpected,
    }
    log.info("loaded %d bytes in %.2f s (%.2f GB/s)", bytes_read, seconds, bytes_read / max(seconds, 1e-9) / 1e9)


def _torch_device(dev: str) -> torch.device:
    if dev == "cpu":
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if int(dev) >= n:
        raise UserError(
            f"memory.max_memory: the plan puts weights on GPU {dev} but this machine has {n} GPU(s); "
            f"use device_map=cpu, other caps, or a dry run (stages=[instantiate_empty,plan])"
        )
    return torch.device("cuda", int(dev))


def _place(model: torch.nn.Module, t: TensorPlan, tensor: torch.Tensor, device: torch.device) -> None:
    if t.quantized:
        bnb = import_bitsandbytes()

        value = bnb.nn.Int8Params(tensor, requires_grad=False, has_fp16_weights=False).to(device)
    else:
        value = tensor.to(device=device, dtype=t.dtype)
        if t.kind == "param":
            value = torch.nn.Parameter(value, requires_grad=False)
    _assign(model, t, value)


def _assign(model: torch.nn.Module, t: TensorPlan, value) -> None:
    mod_name, _, leaf = t.name.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    (module._parameters if t.kind == "param" else module._buffers)[leaf] = value


def _finish_skeleton_tensors(model, tensors: dict[str, TensorPlan], devices) -> None:
    """Buffers the skeleton made itself (rotary frequencies...) move to their planned device."""
    for t in tensors.values():
        if t.source or t.tied_to:
            continue
        mod_name, _, leaf = t.name.rpartition(".")
        module = model.get_submodule(mod_name) if mod_name else model
        store = module._parameters if t.kind == "param" else module._buffers
        current = store[leaf]
        if current is None or current.device.type == "meta" or t.device == "disk":
            continue  # missing from the checkpoint: validate names it
        value = current.to(device=devices[t.device], dtype=t.dtype)
        store[leaf] = torch.nn.Parameter(value, requires_grad=False) if t.kind == "param" else value


def _tie(model, tensors: dict[str, TensorPlan]) -> None:
    for t in tensors.values():
        if t.tied_to and t.device != "disk":
            head = tensors[t.tied_to]
            mod_name, _, leaf = head.name.rpartition(".")
            module = model.get_submodule(mod_name) if mod_name else model
            value = (module._parameters if head.kind == "param" else module._buffers)[leaf]
            _assign(model, t, value)


def _progress_bar(total: int, progress: bool | None):
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="load_shards", file=sys.stderr)
