"""Cold shards are read into the page cache while the process imports (loading/page_cache.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, make_checkpoint, run_cli

from pipeline.loading import page_cache


def _evict(path: Path) -> None:
    """Drop a file's pages from the page cache (clean pages only: written and synced first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _resident(path: Path) -> float:
    """Every MiB of the file checked, not a sample."""
    return page_cache.resident_fraction(str(path), samples=max(1, path.stat().st_size // 2**20), window=2**20)


def _cold_file(tmp_path: Path, mib: int) -> Path:
    path = tmp_path / "cold.bin"
    with open(path, "wb") as fh:
        fh.write(os.urandom(mib * 2**20))
        fh.flush()
        os.fsync(fh.fileno())
    _evict(path)
    if _resident(path) > 0.05:
        pytest.skip(f"{tmp_path}: this filesystem keeps evicted pages (tmpfs?); the page cache cannot be emptied")
    return path


def test_warm_reads_the_whole_file_into_the_page_cache(tmp_path):
    # Larger than one 64 MiB posix_fadvise(WILLNEED) window: Linux serves such a call only up to
    # the device's read-ahead limit, which left most of every window unread (the bug this replaces).
    path = _cold_file(tmp_path, 96)
    thread = page_cache.warm([str(path)])
    assert thread is not None
    thread.join(timeout=120)
    assert _resident(path) > 0.99
    done = page_cache.summary([str(path)])
    assert done["files"] == 1 and done["bytes"] == 96 * 2**20 and done["finished_before"] and done["read_s"] > 0
    assert page_cache.summary([str(tmp_path / "other.safetensors")]) is None  # another run's files: not its own


def test_warm_leaves_cached_and_claimed_files_alone(tmp_path):
    cached = tmp_path / "cached.bin"
    cached.write_bytes(b"x" * (8 * 2**20))
    cached.read_bytes()
    assert page_cache.warm([str(cached)]) is None  # already in the page cache: nothing to read
    cold = _cold_file(tmp_path, 8)
    first = page_cache.warm([str(cold)])
    assert first is not None
    first.join(timeout=60)
    _evict(cold)
    assert page_cache.warm([str(cold)]) is None  # this process took it once: never read twice


def _torch_imported_after(code: str) -> bool:
    """Whether a fresh interpreter has torch imported after running `code`."""
    script = f"import sys\n{code}\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


def test_page_cache_module_imports_no_torch():
    assert not _torch_imported_after(
        "import pipeline.engine.prefetch, pipeline.loading.page_cache, pipeline.engine.compose"
    )


def test_cli_reads_cold_shards_while_the_model_code_is_imported(tmp_path):
    import torch

    ckpt = make_checkpoint("llama", tmp_path / "ckpt", torch.float32)
    shards = sorted(ckpt.glob("*.safetensors"))
    assert len(shards) >= 2
    for shard in shards:
        _evict(shard)
    if max(_resident(s) for s in shards) > 0.05:
        pytest.skip(f"{tmp_path}: this filesystem keeps evicted pages; the page cache cannot be emptied")
    run = tmp_path / "run"
    proc = run_cli(f"checkpoint.path={ckpt}", "quantization=none", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run / "report.json").read_text())
    read_ahead = report["load"]["page_cache"]
    assert read_ahead["files"] == len(shards)
    assert read_ahead["bytes"] == sum(s.stat().st_size for s in shards)
    stages = {s["name"]: s["seconds"] for s in report["stages"]}
    # Started before instantiate_empty (the model-class import and the skeleton) began.
    assert read_ahead["started_s_before"] >= stages["instantiate_empty"] + stages["plan"]
    assert report["validation"]["checks"] and all(report["validation"]["checks"].values())
    assert f"page cache: {len(shards)} cold shard(s)" in (run / "run.log").read_text()


@pytest.mark.parametrize("how", ["warm", "readahead_off"])
def test_no_read_ahead_for_a_warm_checkpoint_or_when_turned_off(tmp_path, how):
    import torch

    ckpt = make_checkpoint("llama", tmp_path / "ckpt", torch.float32)
    extra = []
    for shard in ckpt.glob("*.safetensors"):
        if how == "warm":
            shard.read_bytes()
        else:
            _evict(shard)
            extra = ["stages.load_shards.readahead=false"]
    run = tmp_path / "run"
    proc = run_cli(f"checkpoint.path={ckpt}", "quantization=none", f"hydra.run.dir={run}", *extra)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "report.json").read_text())["load"]["page_cache"] is None


def test_early_start_reads_only_what_load_shards_streams(tmp_path):
    from omegaconf import OmegaConf

    from pipeline.engine.prefetch import gpu_devices, shard_files

    for name in ("a.safetensors", "b.safetensors", "config.json"):
        (tmp_path / name).write_bytes(b"x")
    cfg = OmegaConf.create(
        {"stages": {"instantiate_empty": {}, "load_shards": {}}, "checkpoint": {"path": str(tmp_path)}}
    )
    assert [Path(f).name for f in shard_files(cfg)] == ["a.safetensors", "b.safetensors"]
    dry = OmegaConf.merge(cfg, {"stages": {"load_shards": None}})
    del dry.stages["load_shards"]
    assert shard_files(dry) == []  # a dry run reads no tensor byte
    assert shard_files(OmegaConf.merge(cfg, {"parallel": {"mode": "tensor"}})) == []  # ranks read their slices
    assert shard_files(OmegaConf.merge(cfg, {"checkpoint": {"path": str(tmp_path / "missing")}})) == []
    # The GPUs whose CUDA context is made early: those the caps name, else GPU 0; none for CPU-only.
    assert gpu_devices(OmegaConf.create({"memory": {"max_memory": None}})) == [0]
    assert gpu_devices(OmegaConf.create({"memory": {"max_memory": {1: "20GiB", "cpu": "8GiB"}}})) == [1]
    assert gpu_devices(OmegaConf.create({"memory": {"max_memory": {"cpu": "8GiB", "disk": "1TiB"}}})) == []
    assert gpu_devices(OmegaConf.create({"memory": {"max_memory": {0: "0GiB", 1: "4GiB"}}})) == [1]
    assert gpu_devices(OmegaConf.create({"device_map": {"strategy": "cpu"}, "memory": {"max_memory": None}})) == []


def test_cuda_context_module_is_harmless_without_a_gpu():
    code = "from pipeline.loading.cuda_context import retain_primary_contexts as r\nt = r([0]); t and t.join(30)"
    assert not _torch_imported_after(code)


def _io_class(tid: int) -> int:
    """The I/O scheduling class of one thread (ioprio_get(2)): 0 none, 2 best effort, 3 idle."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    value = libc.syscall(252, 1, tid)  # x86_64 ioprio_get, IOPRIO_WHO_PROCESS
    assert value >= 0, os.strerror(ctypes.get_errno())
    return value >> 13


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="ioprio_get's number is read back on x86_64 only")
def test_read_ahead_runs_at_idle_io_priority_until_the_load_hurries_it(tmp_path):
    import threading

    # The read-ahead thread yields the disk to the imports' page faults (idle class)...
    gate, seen = threading.Event(), {}

    def reader():
        seen["tid"] = threading.get_native_id()
        seen["set"] = page_cache._set_io_class(seen["tid"], "idle")
        with page_cache._lock:
            page_cache._idle_readers.add(seen["tid"])
        gate.wait(30)
        seen["after"] = _io_class(seen["tid"])

    thread = threading.Thread(target=reader)
    thread.start()
    while "set" not in seen:
        pass
    assert seen["set"] and _io_class(seen["tid"]) == 3
    # ...until the load starts and waits on the bytes: back to the normal class.
    page_cache.hurry()
    gate.set()
    thread.join(30)
    assert seen["after"] == 0
    # A real read-ahead reports the priority it ran at.
    path = _cold_file(tmp_path, 8)
    page_cache.warm([str(path)], priority="idle").join(60)
    assert page_cache.summary([str(path)])["priority"] == "idle"


def test_a_read_ahead_the_load_overtook_never_drops_to_idle(tmp_path):
    import threading

    path = _cold_file(tmp_path, 8)
    # The load's hurry() came before the read-ahead thread's first step (a slow thread start).
    page_cache._claimed[str(path)] = {"bytes": 1, "started": 0.0, "priority": "idle", "hurried": 1.0}
    seen = {}

    def read():
        page_cache._read_all([str(path)], "idle")
        seen["class"] = _io_class(threading.get_native_id())

    thread = threading.Thread(target=read)
    thread.start()
    thread.join(60)
    assert seen["class"] == 0 and page_cache._idle_readers == set()
    assert page_cache.summary([str(path)])["raised_at_load"] is True


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("stages.load_shards.readahead_priority=fast", "stages.load_shards.readahead_priority"),
        ("stages.load_shards.readahead=maybe", "stages.load_shards.readahead"),
    ],
)
def test_bad_read_ahead_settings_stop_the_run_before_any_stage(tmp_path, override, key):
    import torch

    ckpt = make_checkpoint("llama", tmp_path / "ckpt", torch.float32)
    run = tmp_path / "run"
    proc = run_cli(f"checkpoint.path={ckpt}", "quantization=none", f"hydra.run.dir={run}", override)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert key in line and ("choose one of idle, normal" in line or "true or false" in line)
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "error" and report["stages"] == []


def test_an_idle_read_ahead_keeps_one_small_request_in_flight_until_hurried(tmp_path, monkeypatch):
    import threading

    # At idle the reader asks for 4 MiB at a time with the kernel's read-ahead off, so an import's
    # page fault never waits behind a queue of 64 MiB reads (the H200 host: 5 s of imports)...
    path = _cold_file(tmp_path, 96)
    sizes, real_preadv = [], os.preadv

    def recording_preadv(fd, buffers, offset):
        sizes.append(sum(len(b) for b in buffers) >> 20)
        if len(sizes) == 3:
            page_cache.hurry()  # the load starts and waits on the bytes
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(page_cache.os, "preadv", recording_preadv)
    tid = threading.get_native_id()
    with page_cache._lock:
        page_cache._idle_readers.add(tid)
    fd = os.open(path, os.O_RDONLY)
    try:
        page_cache._read_file(fd, memoryview(bytearray(page_cache._BUFFER)), tid)
    finally:
        os.close(fd)
    # ...and, once hurried, reads the rest 64 MiB at a time; every byte ends in the cache either way.
    assert sizes[:3] == [4, 4, 4] and set(sizes[3:]) == {64}
    assert tid not in page_cache._idle_readers and _resident(path) > 0.95


def test_the_log_says_whether_the_read_ahead_was_done_or_raised_when_the_load_began(caplog):
    import logging

    from pipeline.stages.load_shards import _log_read_ahead

    row = {"files": 3, "bytes": 13_476_865_040, "started_s_before": 14.0, "priority": "idle"}
    with caplog.at_level(logging.INFO, logger="pipeline"):
        _log_read_ahead({**row, "finished_before": True, "read_s": 7.3, "raised_at_load": False})
        _log_read_ahead({**row, "finished_before": False, "raised_at_load": True})
        _log_read_ahead(None)  # nothing was cold: nothing to say
    lines = [r.getMessage() for r in caplog.records if "page cache" in r.getMessage()]
    assert len(lines) == 2
    assert lines[0].endswith("(done in 7.3 s)") and "13.48 GB" in lines[0]
    assert lines[1].endswith("(still reading when it began, then at full speed)")
