"""Read every planned checkpoint tensor into the skeleton, on its planned device and in its planned form.

Two readers, chosen per tensor by `reader`: stream (GPU tensors under `auto`: loading/streamer.py) and
safetensors (CPU tensors under `auto`: safe_open's memory map, a tensor in its planned dtype staying a
zero-copy view of the file). Tensors planned on disk are not read (accelerate reads them at forward time).
docs/design.md, "Loading".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import torch
from safetensors import safe_open

from ..dtypes import SAFETENSORS_DTYPES, itemsize
from ..errors import UserError
from ..planning import Plan, TensorPlan
from ..planning.slices import piece_bytes
from ..quant.spec import QuantSpec
from ..startup.reader import PRIORITIES
from .assemble import Assembler, assemble_slices
from .assign import finish_skeleton_tensors, place, tie
from .progress import progress_bar, tick
from .slices import SliceReader
from .streamer import Item, ShardStreamer

READERS = ("auto", "stream", "safetensors")


@dataclass(frozen=True)
class ReaderOptions:
    """The reader keys of stages.load_shards and their one default each (the stage's signature reads them here)."""

    reader: str = "auto"
    threads: int | None = None  # None (the YAML's null): from the machine (streamer.machine_defaults)
    chunk_mib: float = 16
    staging_mib: float | None = None  # None: from the machine, as threads
    temp_mib: float = 1024
    readahead: bool = True
    progress: bool | None = None
    readahead_priority: str = PRIORITIES[0]

    def check(self) -> None:
        key = "stages.load_shards"
        if self.reader not in READERS:
            raise UserError(f"{key}.reader: unknown reader {self.reader!r}; choose one of {', '.join(READERS)}")
        if not isinstance(self.readahead, bool):
            raise UserError(
                f"{key}.readahead: {self.readahead!r} is not true or false; set {key}.readahead=true or false"
            )
        if self.readahead_priority not in PRIORITIES:
            raise UserError(
                f"{key}.readahead_priority: unknown priority {self.readahead_priority!r}; "
                f"choose one of {', '.join(PRIORITIES)}"
            )


def check_reader_options(node) -> None:
    """The stage's reader keys checked when the stages are bound, before any stage runs."""
    names = {f.name for f in fields(ReaderOptions)}
    ReaderOptions(**{k: v for k, v in dict(node or {}).items() if k in names}).check()


@dataclass(frozen=True)
class LoadStats:
    seconds: float
    bytes_read: int
    tensors: int
    streamed: int
    mapped: int
    sliced: int = 0  # tensor parallel: tensors of which only this rank's slice was read


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
    assembler = Assembler(model, plan, devices, spec)
    todo = [
        (checkpoint.tensors[t.source], t)
        for t in plan.tensors.values()
        if t.source and t.device != "disk" and t.conversion is None
    ]
    sliced = [(i, t) for i, t in todo if t.slice is not None]  # tensor parallel: this rank's shards only
    sliced_converted = [t for t in plan.tensors.values() if t.conversion and t.slice and not t.tied_to]
    todo = [(i, t) for i, t in todo if t.slice is None]
    todo += [(checkpoint.tensors[key], None) for key in assembler.uses]  # sources of converted tensors

    def device_of(info, t):
        return devices[t.device if t is not None else assembler.device_of(info.name)]

    pickled = checkpoint.pickled  # pickle checkpoints: memory-mapped by torch.load, no byte offsets to stream
    stream = options.reader == "stream" and pickled is None
    auto = options.reader == "auto" and pickled is None
    streamed = [(i, t) for i, t in todo if stream or (auto and device_of(i, t).type == "cuda")]
    streamed_names = {i.name for i, _ in streamed}
    mapped = [(i, t) for i, t in todo if i.name not in streamed_names]
    slice_total = sum(t.slice.nbytes(itemsize(SAFETENSORS_DTYPES[i.dtype])) for i, t in sliced)
    slice_total += sum(
        piece_bytes(checkpoint.tensors[p.source], p) for t in sliced_converted for p in t.conversion.pieces
    )
    count = len(todo) + len(sliced) + len(sliced_converted)
    bar = progress_bar(sum(i.nbytes for i, _ in todo) + slice_total, count, options.progress)

    saved = SavedStats(plan, checkpoint)

    def put(info, t: TensorPlan | None, tensor: torch.Tensor) -> None:
        if t is None:
            assembler.feed(info.name, tensor)
        else:
            place(model, t, tensor, devices[t.device], spec, saved.of(t))

    start = time.perf_counter()
    sliced_bytes = _read_sliced(model, sliced, sliced_converted, checkpoint, devices, spec, bar)
    if streamed:
        _stream(streamed, device_of, put, options, bar)
    _read_mapped(mapped, put, bar, pickled)
    finish_skeleton_tensors(model, plan.tensors, devices)
    tie(model, plan.tensors)
    for dev in devices.values():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    saved.close()
    read = sum(i.nbytes for i, _ in todo) + sliced_bytes
    return LoadStats(seconds, read, count, len(streamed), len(mapped), len(sliced) + len(sliced_converted))


def _stream(pairs, device_of, put, options: ReaderOptions, bar) -> None:
    by_name = {i.name: t for i, t in pairs}
    streamer = ShardStreamer(
        options.threads or None,  # None: from the machine (streamer.machine_defaults)
        options.chunk_mib * 2**20 if options.chunk_mib else None,
        options.staging_mib * 2**20 if options.staging_mib else None,
        options.temp_mib * 2**20,
        options.readahead,
    )
    items = [Item(i, device_of(i, t), final_in_place=t is not None and _in_place(i, t)) for i, t in pairs]

    def finish(item: Item) -> None:
        put(item.info, by_name[item.info.name], item.typed())
        tick(bar)

    streamer.run(items, finish, on_bytes=bar.update if bar is not None else None)


def _in_place(info, t: TensorPlan) -> bool:
    return not t.quantized and SAFETENSORS_DTYPES[info.dtype] == t.dtype


def _read_sliced(model, pairs, converted, checkpoint, devices, spec, bar) -> int:
    """Tensor parallel: only this rank's byte ranges of each tensor (loading/slices.py), cast or quantized as a shard."""
    with SliceReader() as reader:
        for info, t in sorted(pairs, key=lambda p: (p[0].file, p[0].start)):
            before = reader.bytes_read
            place(model, t, reader.read(info, t.slice), devices[t.device], spec)
            _advance(bar, reader.bytes_read - before)
        for t in converted:  # fused from several checkpoint tensors: each piece's own range
            before = reader.bytes_read
            assemble_slices(model, t, checkpoint, reader, devices[t.device], spec)
            _advance(bar, reader.bytes_read - before)
        return reader.bytes_read


def _read_mapped(pairs, put, bar, pickled) -> None:
    """safe_open's memory map, shard by shard, tensors in file order (or torch.load's map for pickles)."""
    if pickled is not None:
        for info, t in pairs:
            put(info, t, pickled[info.name])
            _advance(bar, info.nbytes)
        return
    by_file: dict[str, list] = {}
    for info, t in pairs:
        by_file.setdefault(info.file, []).append((info, t))
    for path, group in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as fh:
            for info, t in sorted(group, key=lambda p: p[0].start):
                put(info, t, fh.get_tensor(info.name))
                _advance(bar, info.nbytes)


def _advance(bar, nbytes: int) -> None:
    if bar is not None:
        bar.update(nbytes)
        tick(bar)


class SavedStats:
    """The stats a pre-quantized weight was saved with (int8 SCB, 4-bit absmax, quant_state...), read on the CPU
    from their shards (one open handle per shard for the load); None for every other tensor."""

    def __init__(self, plan: Plan, checkpoint):
        self.plan, self.checkpoint, self.handles = plan, checkpoint, {}

    def of(self, t: TensorPlan) -> dict[str, torch.Tensor] | None:
        stats = self.plan.saved_stats.get(t.name)
        if stats is None:
            return None
        return {stat: self._read(key) for stat, key in stats.items()}

    def _read(self, key: str) -> torch.Tensor:
        if self.checkpoint.pickled is not None:
            return self.checkpoint.pickled[key]
        info = self.checkpoint.tensors[key]
        if info.file not in self.handles:
            self.handles[info.file] = safe_open(info.file, framework="pt", device="cpu")
        return self.handles[info.file].get_tensor(key)

    def close(self) -> None:
        self.handles.clear()


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
