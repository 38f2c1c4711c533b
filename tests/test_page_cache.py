"""Cold shards are read into the page cache while the process imports (pipeline/startup/reader.py)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import REPO, make_checkpoint, run_cli

from pipeline.startup import reader as page_cache


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


def test_the_startup_package_imports_neither_torch_nor_transformers():
    # Every module of it, the CLI's own (which compose the config) too: all of it runs before torch's import.
    modules = sorted(p.stem for p in (REPO / "pipeline" / "startup").glob("*.py") if p.stem != "__init__")
    assert {"command", "usage", "prefetch", "reader", "readahead_process", "cuda_context"} <= set(modules)
    code = "import pipeline.startup, " + ", ".join(f"pipeline.startup.{m}" for m in modules)
    script = f"import sys\n{code}\nprint(sorted({{'torch', 'transformers'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


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
    assert read_ahead["priority"] == "idle" and read_ahead["yielded_s"] >= 0.0
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

    from pipeline.startup.prefetch import gpu_devices, shard_files

    for name in ("a.safetensors", "b.safetensors", "config.json"):
        (tmp_path / name).write_bytes(b"x")
    cfg = OmegaConf.create(
        {"stages": {"instantiate_empty": {}, "load_shards": {"readahead": True}}, "checkpoint": {"path": str(tmp_path)}}
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
    code = "from pipeline.startup.cuda_context import retain_primary_contexts as r\nt = r([0]); t and t.join(30)"
    assert not _torch_imported_after(code)


@contextlib.contextmanager
def _busy_disk(tmp_path: Path):
    """This process keeps reading from the disk (64 KiB cold reads, back to back, in a thread),
    as an import's page faults and metadata reads do: what an idle reader yields to."""
    path = tmp_path / "busy.bin"
    with open(path, "wb") as fh:
        fh.write(os.urandom(16 * 2**20))
        os.fsync(fh.fileno())
    stop, reads = threading.Event(), [0]

    def read():
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        offset = path.stat().st_size
        while not stop.is_set():
            if offset >= path.stat().st_size:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                offset = 0
            os.pread(fd, 2**16, offset)
            offset += 2**16
            reads[0] += 1
        os.close(fd)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    try:
        yield reads
    finally:
        stop.set()
        thread.join(10)


def _row(path: Path) -> dict:
    with page_cache._lock:
        return dict(page_cache.READ_AHEAD[str(path)])


def test_an_idle_read_ahead_reads_gently_in_its_own_process(tmp_path):
    # Its own process: the reads never wait for this process' GIL (held by the imports)...
    path = _cold_file(tmp_path, 24)
    thread = page_cache.warm([str(path)], priority="idle")
    readers = list(page_cache._readers)
    assert len(readers) == 1 and readers[0].pid != os.getpid()
    thread.join(60)
    row = _row(path)
    # ...one 4 MiB request at a time (an import's read waits behind one at most), every byte cached.
    assert (row["gentle_reads"], row["fast_reads"]) == (6, 0)
    assert _resident(path) > 0.99 and page_cache._readers == []
    if os.uname().machine == "x86_64":
        assert row["io_class"] == 3  # Linux's idle I/O class, read back by the reader


def test_an_idle_read_ahead_yields_to_this_process_reads_until_the_load_hurries_it(tmp_path):
    path = _cold_file(tmp_path, 96)
    with _busy_disk(tmp_path) as reads:
        while reads[0] < 10:
            time.sleep(0.01)
        thread = page_cache.warm([str(path)], priority="idle")
        time.sleep(0.5)  # each gentle read waits up to 0.1 s for a pause in this process' reads
        page_cache.hurry()  # the load starts and waits on the bytes
        thread.join(60)
    row = _row(path)
    # Gentle and yielding while the process read; after the hurry, 64 MiB reads at normal class.
    assert row["gentle_reads"] >= 1 and row["fast_reads"] >= 1 and row["yielded_s"] > 0.1
    assert row["gentle_reads"] * 4 + row["fast_reads"] * 64 >= 96
    assert _resident(path) > 0.99
    if os.uname().machine == "x86_64":
        assert row["io_class"] == 0
    done = page_cache.summary([str(path)])
    assert done["raised_at_load"] is True and done["priority"] == "idle" and done["yielded_s"] > 0.1


def test_a_read_ahead_the_load_overtook_reads_at_full_speed(tmp_path):
    path = _cold_file(tmp_path, 128)
    with _busy_disk(tmp_path):
        thread = page_cache.warm([str(path)], priority="idle")
        page_cache.hurry()  # the load began before the reader's first read
        thread.join(60)
    row = _row(path)
    assert row["fast_reads"] >= 1 and row["gentle_reads"] * 4 + row["fast_reads"] * 64 >= 128
    assert _resident(path) > 0.99


def _idle_reader_of_this_process(path: Path) -> subprocess.Popen:
    """The reader process run by hand on one file, yielding to this process, past its first word."""
    argv = [sys.executable, "-I", "-S", page_cache._CHILD, str(os.getpid()), "idle", str(path)]
    reader = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert reader.stdout.readline().startswith(b"class")
    return reader


def test_the_reader_stops_when_this_process_closes_its_pipe(tmp_path):
    # A run that ends (or dies) before its read-ahead did leaves no reader behind on the disk.
    path = _cold_file(tmp_path, 256)
    with _busy_disk(tmp_path):
        reader = _idle_reader_of_this_process(path)
        reader.stdin.close()
        assert reader.wait(10) == 0
    assert reader.stdout.read() == b""  # stopped before it finished the file
    assert _resident(path) < 0.5


def test_the_reader_says_how_long_it_yielded_as_soon_as_it_is_hurried(tmp_path):
    # The report's yielded_s is known when the load starts, not only once the last file is read.
    path = _cold_file(tmp_path, 64)
    with _busy_disk(tmp_path):
        reader = _idle_reader_of_this_process(path)
        time.sleep(0.3)
        reader.stdin.write(b"h")
        reader.stdin.flush()
        lines = [reader.stdout.readline().split() for _ in range(3)]
        reader.stdin.close()
        assert reader.wait(30) == 0
    assert lines[0][0] == b"class" and lines[1][0] == b"yielded" and lines[2][0] == b"file"
    assert 0.1 < float(lines[1][1]) <= float(lines[2][5])
    gentle, fast = int(lines[2][3]), int(lines[2][4])
    assert gentle >= 1 and fast >= 1 and gentle * 4 + fast * 64 >= 64


def test_no_reader_no_read_ahead(tmp_path, monkeypatch):
    # Where no reader process can start, nothing is claimed: the load reads the bytes itself.
    path = _cold_file(tmp_path, 8)
    monkeypatch.setattr(page_cache.sys, "executable", "")
    assert page_cache.warm([str(path)], priority="idle") is None
    monkeypatch.undo()
    assert page_cache.summary([str(path)]) is None
    page_cache.warm([str(path)]).join(60)
    assert _resident(path) > 0.99


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
