"""Read every planned checkpoint tensor into the skeleton, on its planned device and in its planned form.

Two readers, chosen per tensor by `reader`:
- stream (GPU tensors under `auto`): loading/streamer.py reads chunks on several
  threads into a bounded pool of pinned buffers and copies them to the GPU
  asynchronously; casts and quantization happen on the GPU.
- safetensors (CPU tensors under `auto`): safe_open's memory map, one tensor at a
  time in file order; a tensor already in its planned dtype stays a zero-copy,
  copy-on-write view of the file, so host memory never holds the checkpoint twice.
Tensors planned on disk are not read (accelerate reads them at forward time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from safetensors import safe_open

from ..dtypes import SAFETENSORS_DTYPES
from ..errors import UserError
from ..planning import Plan, TensorPlan
from ..quant.spec import QuantSpec
from .assign import finish_skeleton_tensors, place, tie
from .progress import progress_bar, tick
from .streamer import Item, ShardStreamer

READERS = ("auto", "stream", "safetensors")


@dataclass(frozen=True)
class ReaderOptions:
    reader: str = "auto"
    threads: int = 12
    chunk_mib: float = 16
    staging_mib: float = 256
    temp_mib: float = 1024
    readahead: bool = True
    progress: bool | None = None

    def check(self) -> None:
        if self.reader not in READERS:
            raise UserError(
                f"stages.load_shards.reader: unknown reader {self.reader!r}; choose one of {', '.join(READERS)}"
            )


@dataclass(frozen=True)
class LoadStats:
    seconds: float
    bytes_read: int
    tensors: int
    streamed: int
    mapped: int


def target_devices(plan: Plan) -> dict[str, torch.device]:
    """torch devices for the plan's devices (disk excluded); CUDA contexts made and peak stats reset."""
    devices = {dev: _torch_device(dev) for dev in plan.devices if dev != "disk"}
    for dev in devices.values():
        if dev.type == "cuda":
            torch.zeros(1, device=dev)  # creates the CUDA context if nothing has yet
            torch.cuda.reset_peak_memory_stats(dev)
    return devices


def load_tensors(
    model, plan: Plan, checkpoint, spec: QuantSpec, devices: dict[str, torch.device], options: ReaderOptions
) -> LoadStats:
    todo = [(checkpoint.tensors[t.source], t) for t in plan.tensors.values() if t.source and t.device != "disk"]
    pickled = checkpoint.pickled  # pickle checkpoints: memory-mapped by torch.load, no byte offsets to stream
    streamed = (
        []
        if pickled is not None
        else [
            (i, t)
            for i, t in todo
            if options.reader == "stream" or (options.reader == "auto" and devices[t.device].type == "cuda")
        ]
    )
    streamed_names = {i.name for i, _ in streamed}
    mapped = [(i, t) for i, t in todo if i.name not in streamed_names]
    bar = progress_bar(sum(i.nbytes for i, _ in todo), len(todo), options.progress)

    def scale_of(t: TensorPlan):
        return _saved_scale(plan, checkpoint, t)

    start = time.perf_counter()
    if streamed:
        _stream(model, streamed, devices, spec, options, bar, scale_of)
    _read_mapped(model, mapped, devices, spec, bar, pickled, scale_of)
    finish_skeleton_tensors(model, plan.tensors, devices)
    tie(model, plan.tensors)
    for dev in devices.values():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return LoadStats(seconds, sum(i.nbytes for i, _ in todo), len(todo), len(streamed), len(mapped))


def _stream(model, pairs, devices, spec, options: ReaderOptions, bar, scale_of) -> None:
    by_name = {i.name: t for i, t in pairs}
    streamer = ShardStreamer(
        options.threads or None,  # None: from the machine (streamer.machine_defaults)
        options.chunk_mib * 2**20 if options.chunk_mib else None,
        options.staging_mib * 2**20 if options.staging_mib else None,
        options.temp_mib * 2**20,
        options.readahead,
    )
    items = [Item(i, devices[t.device], final_in_place=_in_place(i, t)) for i, t in pairs]

    def finish(item: Item) -> None:
        t = by_name[item.info.name]
        place(model, t, item.typed(), item.device, spec, scale_of(t))
        tick(bar)

    streamer.run(items, finish, on_bytes=bar.update if bar is not None else None)


def _in_place(info, t: TensorPlan) -> bool:
    return not t.quantized and SAFETENSORS_DTYPES[info.dtype] == t.dtype


def _read_mapped(model, pairs, devices, spec, bar, pickled, scale_of) -> None:
    """safe_open's memory map, shard by shard, tensors in file order (or torch.load's map for pickles)."""
    if pickled is not None:
        for info, t in pairs:
            place(model, t, pickled[info.name], devices[t.device], spec, scale_of(t))
            _advance(bar, info.nbytes)
        return
    by_file: dict[str, list] = {}
    for info, t in pairs:
        by_file.setdefault(info.file, []).append((info, t))
    for path, group in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as fh:
            for info, t in sorted(group, key=lambda p: p[0].start):
                place(model, t, fh.get_tensor(info.name), devices[t.device], spec, scale_of(t))
                _advance(bar, info.nbytes)


def _advance(bar, nbytes: int) -> None:
    if bar is not None:
        bar.update(nbytes)
        tick(bar)


def _saved_scale(plan: Plan, checkpoint, t: TensorPlan):
    """The fp32 row scales a saved int8 checkpoint keeps beside a weight (None for other tensors)."""
    key = plan.scales.get(t.name)
    if key is None:
        return None
    info = checkpoint.tensors[key]
    with safe_open(info.file, framework="pt", device="cpu") as fh:
        return fh.get_tensor(key)


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
