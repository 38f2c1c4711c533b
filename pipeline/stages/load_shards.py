"""Stage 4: stream every checkpoint tensor to its planned device and dtype (loading/shards.py).

Measures the load (seconds, bytes, peak host memory, peak GPU memory), attaches
accelerate's offload hooks when the plan offloads modules, and sets what from_pretrained
sets on its model (loading/hf_attributes.py).
"""

from __future__ import annotations

import logging
import time

import torch

from ..loading.hf_attributes import set_hf_attributes
from ..loading.offload import dispatch
from ..loading.shards import ReaderOptions, check_reader_options, load_tensors, target_devices
from ..loading.streamer import machine_defaults
from ..measure.memory import PeakAnonSampler
from ..startup.reader import hurry
from ..startup.reader import summary as page_cache_summary
from .context import LoadContext
from .traits import stage

log = logging.getLogger(__name__)


def _precheck(cfg, run_dir, keys: dict) -> None:
    """The reader keys, before any stage runs (imported with the stage: after the engine started reading)."""
    check_reader_options(keys)


@stage(precheck=_precheck, loads_weights=True)
def load_shards(
    ctx: LoadContext,
    *,
    progress: bool | None = ReaderOptions.progress,
    reader: str = ReaderOptions.reader,
    threads: int | None = ReaderOptions.threads,
    chunk_mib: float | None = ReaderOptions.chunk_mib,
    staging_mib: float | None = ReaderOptions.staging_mib,
    temp_mib: float = ReaderOptions.temp_mib,
    readahead: bool = ReaderOptions.readahead,
    readahead_priority: str = ReaderOptions.readahead_priority,
) -> None:
    plan = ctx.require("plan", "load_shards", "plan")
    options = ReaderOptions(reader, threads, chunk_mib, staging_mib, temp_mib, readahead, progress, readahead_priority)
    options.check()
    devices = target_devices(plan)
    started = time.perf_counter()
    hurry()  # a read-ahead still at idle I/O priority: the load waits on its bytes now
    with PeakAnonSampler() as sampler:
        stats = load_tensors(ctx.model, plan, ctx.checkpoint, ctx.quant, devices, options)
    model = ctx.model
    model.eval()  # a loaded model is for inference, as from_pretrained returns it
    if plan.needs_dispatch:
        ctx.offload = dispatch(model, plan, ctx.checkpoint)
    set_hf_attributes(model, plan.device_map, ctx.quant, plan.quantized_modules, plan.int8_thresholds)
    ctx.loaded = True
    seconds = stats.seconds
    ctx.report["load"] = {
        "seconds": round(seconds, 4),
        "bytes_read": stats.bytes_read,
        "gb_per_s": round(stats.bytes_read / seconds / 1e9, 3) if seconds > 0 else 0.0,
        "tensors": stats.tensors,
        "reader": {
            "streamed": stats.streamed,
            "mapped": stats.mapped,
            **_reader_shape(threads, chunk_mib, staging_mib),
        },
        "baseline_host_anon_bytes": sampler.baseline,
        "peak_host_anon_bytes": sampler.peak,
        "peak_gpu_bytes": {
            str(d.index): torch.cuda.max_memory_allocated(d) for d in devices.values() if d.type == "cuda"
        },
        # What was read into the page cache ahead of the load (startup/reader.py).
        "page_cache": page_cache_summary(ctx.checkpoint.files, started),
        "missing_keys": plan.missing,
        "unexpected_keys": plan.unexpected,
    }
    ctx.parallel.loaded(model, plan, ctx.report)  # tensor parallel: DTensors and forward hooks; every rank's load
    _log_read_ahead(ctx.report["load"]["page_cache"])
    log.info(
        "loaded %d bytes in %.2f s (%.2f GB/s)", stats.bytes_read, seconds, stats.bytes_read / max(seconds, 1e-9) / 1e9
    )


def _log_read_ahead(ahead: dict | None) -> None:
    if not ahead:
        return
    if ahead["finished_before"]:
        state = f"done in {ahead['read_s']:.1f} s"
    elif ahead.get("raised_at_load"):
        state = "still reading when it began, then at full speed"
    else:
        state = "still reading when it began"
    log.info(
        "page cache: %d cold shard(s), %.2f GB, read ahead from %.1f s before the load (%s)",
        ahead["files"],
        ahead["bytes"] / 1e9,
        ahead["started_s_before"],
        state,
    )


def _reader_shape(threads, chunk_mib, staging_mib) -> dict:
    """The streamer's threads, chunk and pinned pool as used (null in the config: chosen from the machine)."""
    mib = 2**20
    shape = machine_defaults(
        threads, chunk_mib * mib if chunk_mib else None, staging_mib * mib if staging_mib else None
    )
    return {"threads": shape.threads, "chunk_mib": shape.chunk / mib, "staging_mib": shape.staging / mib}
