"""Stage 4: stream every checkpoint tensor to its planned device and dtype.

Two readers, chosen per tensor by `reader`:
- stream (GPU tensors under `auto`): pipeline.streaming reads chunks on several
  threads into a bounded pool of pinned buffers and copies them to the GPU
  asynchronously; casts and int8 quantization happen on the GPU.
- safetensors (CPU tensors under `auto`): safe_open's memory map, one tensor at a
  time in file order; a tensor already in its planned dtype stays a zero-copy,
  copy-on-write view of the file, so host memory never holds the checkpoint twice.
Quantized weights (int8, nf4, fp4) are quantized by bitsandbytes on their target
device as they arrive.
Tensors planned on disk are not read (accelerate reads them at forward time).
"""
from __future__ import annotations

import logging
import sys
import time

import torch
from safetensors import safe_open

from ..bnb import import_bitsandbytes
from ..context import LoadContext
from ..dtypes import SAFETENSORS_DTYPES
from ..errors import UserError
from ..memory_probe import PeakAnonSampler
from ..offload import dispatch, needs_dispatch
from ..planning import TensorPlan
from ..streaming import Item, ShardStreamer

log = logging.getLogger(__name__)

READERS = ("auto", "stream", "safetensors")


def load_shards(ctx: LoadContext, *, progress: bool | None = None, reader: str = "auto", threads: int = 12,
                chunk_mib: float = 16, staging_mib: float = 256, temp_mib: float = 1024, readahead: bool = True) -> None:
    plan = ctx.require("plan", "load_shards", "plan")
    if reader not in READERS:
        raise UserError(f"stages.load_shards.reader: unknown reader {reader!r}; choose one of {', '.join(READERS)}")
    model = ctx.model
    devices = {dev: _torch_device(dev) for dev in plan.devices if dev != "disk"}
    todo = [(ctx.checkpoint.tensors[t.source], t) for t in plan.tensors.values() if t.source and t.device != "disk"]
    pickled = ctx.checkpoint.pickled  # pickle checkpoints: memory-mapped by torch.load, no byte offsets to stream
    streamed = [] if pickled is not None else [
        (i, t) for i, t in todo if reader == "stream" or (reader == "auto" and devices[t.device].type == "cuda")]
    streamed_names = {i.name for i, _ in streamed}
    mapped = [(i, t) for i, t in todo if i.name not in streamed_names]
    for dev in devices.values():
        if dev.type == "cuda":
            torch.zeros(1, device=dev)  # creates the CUDA context if nothing has yet
            torch.cuda.reset_peak_memory_stats(dev)
    bar = _progress_bar(sum(i.nbytes for i, _ in todo), len(todo), progress)
    start = time.perf_counter()
    with PeakAnonSampler() as sampler:
        if streamed:
            by_name = {i.name: t for i, t in streamed}
            streamer = ShardStreamer(threads, chunk_mib * 2**20, staging_mib * 2**20, temp_mib * 2**20, readahead)
            items = [Item(i, devices[t.device], final_in_place=_in_place(i, t)) for i, t in streamed]

            def finish(item: Item) -> None:
                t = by_name[item.info.name]
                _place(model, t, item.typed(), item.device, _saved_scale(ctx, t), ctx.quantization)
                _tick(bar)

            streamer.run(items, finish, on_bytes=bar.update if bar is not None else None)
        _read_mapped(model, mapped, devices, bar, pickled, lambda t: _saved_scale(ctx, t), ctx.quantization)
        _finish_skeleton_tensors(model, plan.tensors, devices)
        _tie(model, plan.tensors)
        for dev in devices.values():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    bytes_read = sum(i.nbytes for i, _ in todo)
    model.hf_device_map = dict(plan.device_map)
    model.eval()  # a loaded model is for inference, as from_pretrained returns it
    if needs_dispatch(plan):
        ctx.offload = dispatch(model, plan, ctx.checkpoint)
    ctx.loaded = True
    ctx.report["load"] = {
        "seconds": round(seconds, 4),
        "bytes_read": bytes_read,
        "gb_per_s": round(bytes_read / seconds / 1e9, 3) if seconds > 0 else 0.0,
        "tensors": len(todo),
        "reader": {"streamed": len(streamed), "mapped": len(mapped), "threads": threads, "staging_mib": staging_mib},
        "baseline_host_anon_bytes": sampler.baseline,
        "peak_host_anon_bytes": sampler.peak,
        "peak_gpu_bytes": {str(d.index): torch.cuda.max_memory_allocated(d) for d in devices.values() if d.type == "cuda"},
        "missing_keys": plan.missing,
        "unexpected_keys": plan.unexpected,
    }
    log.info("loaded %d bytes in %.2f s (%.2f GB/s)", bytes_read, seconds, bytes_read / max(seconds, 1e-9) / 1e9)


def _in_place(info, t: TensorPlan) -> bool:
    return not t.quantized and SAFETENSORS_DTYPES[info.dtype] == t.dtype


def _read_mapped(model, pairs, devices, bar, pickled=None, scale_of=lambda t: None, quant=None) -> None:
    """safe_open's memory map, shard by shard, tensors in file order (or torch.load's map for pickles)."""
    if pickled is not None:
        for info, t in pairs:
            _place(model, t, pickled[info.name], devices[t.device], scale_of(t), quant)
            if bar is not None:
                bar.update(info.nbytes)
                _tick(bar)
        return
    by_file: dict[str, list] = {}
    for info, t in pairs:
        by_file.setdefault(info.file, []).append((info, t))
    for path, group in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as fh:
            for info, t in sorted(group, key=lambda p: p[0].start):
                _place(model, t, fh.get_tensor(info.name), devices[t.device], scale_of(t), quant)
                if bar is not None:
                    bar.update(info.nbytes)
                    _tick(bar)


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


def _place(model: torch.nn.Module, t: TensorPlan, tensor: torch.Tensor, device: torch.device, scale=None,
           quant=None) -> None:
    if t.quantized and scale is not None:  # saved int8: the weight and its scales as they were written
        bnb = import_bitsandbytes()
        cb, scb = tensor.to(device), scale.to(device)
        value = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    elif t.quantized == "int8":
        value = _int8(tensor.to(device))
    elif t.quantized:
        value = _four_bit(tensor.to(device), model.get_submodule(t.name.rpartition(".")[0]), quant)
    else:
        value = tensor.to(device=device, dtype=t.dtype)
        if t.kind == "param":
            value = torch.nn.Parameter(value, requires_grad=False)
    _assign(model, t, value)


def _saved_scale(ctx: LoadContext, t: TensorPlan):
    """The fp32 row scales a saved int8 checkpoint keeps beside a weight (None for other tensors)."""
    key = ctx.plan.scales.get(t.name)
    if key is None:
        return None
    info = ctx.checkpoint.tensors[key]
    with safe_open(info.file, framework="pt", device="cpu") as fh:
        return fh.get_tensor(key)


def _int8(weight: torch.Tensor):
    """LLM.int8 row-wise quantization on the weight's own device, exactly as Int8Params does it."""
    bnb = import_bitsandbytes()
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
    return bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)


def _four_bit(weight: torch.Tensor, module, quant: dict):
    """nf4/fp4 blockwise quantization on the weight's own device, from the compute dtype (as Params4bit does
    from the load dtype), so that dequantized weights come back in the dtype the layer multiplies in.

    On CPUs with AVX512-BF16, bitsandbytes would repack the weight at the first forward (absmax to bf16,
    double quantization undone), changing its size after the plan; we keep the canonical layout there, so
    the plan holds on every device and double quantization keeps its saving on the CPU.
    """
    bnb = import_bitsandbytes()
    packed, state = bnb.functional.quantize_4bit(
        weight.contiguous().to(module.compute_dtype), blocksize=quant["blocksize"],
        compress_statistics=quant["double_quant"], quant_type=quant["method"], quant_storage=torch.uint8)
    module.support_avx512bf16_for_cpu = False
    module.quant_state = state
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=quant["blocksize"],
                             compress_statistics=quant["double_quant"], quant_type=quant["method"],
                             quant_storage=torch.uint8, module=module, bnb_quantized=True)


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


def _progress_bar(total: int, tensors: int, progress: bool | None):
    """Bytes and tensors with their rate, on a terminal (or when forced with progress=true)."""
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="load_shards", file=sys.stderr)
    bar.tensors_total, bar.tensors_done = tensors, 0
    return bar


def _tick(bar) -> None:
    if bar is not None:
        bar.tensors_done += 1
        bar.set_postfix_str(f"{bar.tensors_done}/{bar.tensors_total} tensors", refresh=False)
