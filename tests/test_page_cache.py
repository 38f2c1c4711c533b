"""Cold shards are read into the page cache while the process imports (pipeline/startup/reader.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    assert {"command", "usage", "prefetch", "reader", "cuda_context"} <= set(modules)
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
    assert set(read_ahead) >= {"started_s_before", "finished_before"}
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
    code = "from pipeline.startup.cuda_context import retain_primary_contexts as r\nt = r([0]); t and t.join(30)"
    assert not _torch_imported_after(code)


def test_a_bad_read_ahead_setting_stops_the_run_before_any_stage(tmp_path):
    import torch

    ckpt = make_checkpoint("llama", tmp_path / "ckpt", torch.float32)
    run = tmp_path / "run"
    proc = run_cli(
        f"checkpoint.path={ckpt}", "quantization=none", f"hydra.run.dir={run}", "stages.load_shards.readahead=maybe"
    )
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "stages.load_shards.readahead" in line and "true or false" in line
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "error" and report["stages"] == []


def test_the_log_says_whether_the_read_ahead_was_done_when_the_load_began(caplog):
    import logging

    from pipeline.stages.load_shards import _log_read_ahead

    row = {"files": 3, "bytes": 13_476_865_040, "started_s_before": 14.0}
    with caplog.at_level(logging.INFO, logger="pipeline"):
        _log_read_ahead({**row, "finished_before": True, "read_s": 7.3})
        _log_read_ahead({**row, "finished_before": False})
        _log_read_ahead(None)  # nothing was cold: nothing to say
    lines = [r.getMessage() for r in caplog.records if "page cache" in r.getMessage()]
    assert len(lines) == 2
    assert lines[0].endswith("(done in 7.3 s)") and "13.48 GB" in lines[0]
    assert lines[1].endswith("(still reading when it began)")
