"""What a run can start before its stages need it: the CUDA context and the shards' bytes.

The CLI calls `start_cuda` as soon as Hydra has composed the config, before torch is imported:
the driver makes the GPU's context (startup/cuda_context.py) while Python imports. The runner
calls both, `start_reading` once torch is in: a cold page cache fills (startup/reader.py) while
the model code and bitsandbytes are imported and the skeleton is built. Both are best effort
and change nothing that is planned or loaded: any doubt, and nothing starts.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("pipeline")


def start_cuda(cfg) -> None:
    """Make the CUDA contexts of the GPUs the load will use, off the GIL (each GPU once per
    process). Torch-free: the CLI calls this before torch is imported."""
    try:
        devices = gpu_devices(cfg) if shard_files(cfg) else []
        if devices and not _torch_cuda_ready():
            from .cuda_context import retain_primary_contexts

            retain_primary_contexts(devices)
    except Exception:  # noqa: BLE001 - an optimisation never fails a run
        log.debug("early CUDA context skipped", exc_info=True)


def start_reading(cfg) -> None:
    """Read the cold shards into the page cache in a reader process (startup/reader.py), each
    file once per process, at stages.load_shards.readahead_priority (idle by default: the
    imports' own page faults go first); none when stages.load_shards.readahead is false. Called once
    torch is imported, not before: a read beside torch's import made cold runs slower (docs/design.md)."""
    try:
        node = _streaming_stage(cfg)
        if node is None or node.get("readahead") is False:
            return
        from .reader import PRIORITIES, warm

        priority = node.get("readahead_priority", PRIORITIES[0])
        if priority in PRIORITIES:  # anything else: the stages' check says so, before any stage runs
            warm(shard_files(cfg), priority=priority)
    except Exception:  # noqa: BLE001 - an optimisation never fails a run
        log.debug("page-cache read-ahead skipped", exc_info=True)


def _torch_cuda_ready() -> bool:
    torch = sys.modules.get("torch")  # never imported here: only asked when the caller has it
    return torch is not None and hasattr(torch, "cuda") and torch.cuda.is_initialized()


def _streaming_stage(cfg):
    """The node of the stage that streams the shards, known by its keys as the engine knows a stage by its
    signature: the one with the read-ahead keys (stages/load_shards.py's parameters); None in a dry run."""
    nodes = (cfg.get("stages") or {}).values()
    return next((n for n in nodes if hasattr(n, "keys") and "readahead" in n), None)


def shard_files(cfg) -> list[str]:
    """The safetensors files the run will stream, or [] when it reads none (dry run, tensor parallel)."""
    node = cfg.get("checkpoint") or {}
    if _streaming_stage(cfg) is None:
        return []  # a dry run reads no tensor byte
    if str((cfg.get("parallel") or {}).get("mode")) == "tensor":
        return []  # each rank reads only its own byte ranges
    path = node.get("path")
    if not path and node.get("builtin"):
        from ..cache_home import cache_dir

        path = os.path.join(cache_dir(), str(node["builtin"]))
    if not path or not os.path.isdir(str(path)):
        return []
    return sorted(os.path.join(str(path), f) for f in os.listdir(str(path)) if f.endswith(".safetensors"))


def gpu_devices(cfg) -> list[int]:
    """GPU indices the load will certainly use: those memory.max_memory gives room on, else GPU 0
    (every GPU plan fills it first); none for a CPU-only strategy or CPU/disk-only caps. Runs before
    the stages are bound (and torch imported), so it reads the raw value with the one parser; a bad
    cap raises here and is skipped by the caller: binding the plan stage reports it."""
    if (cfg.get("device_map") or {}).get("strategy") == "cpu":
        return []
    from ..sizes import MaxMemory

    max_memory = MaxMemory.parse((cfg.get("memory") or {}).get("max_memory"))
    if not max_memory.given:
        return [0]
    return [int(d) for d, size in max_memory.sizes.items() if d.isdigit() and size > 0]
