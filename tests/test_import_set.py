"""The files a command's imports touch: recorded at the end of a run, read ahead at the next start
(loading/import_set.py). Real child processes, real mappings, a real cold page cache."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, run_cli
from test_page_cache import _cold_file, _evict, _resident

from pipeline.loading import import_set
from pipeline.loading.page_cache import resident_share

PAGE = mmap.PAGESIZE


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_LOADER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIPELINE_IMPORT_READAHEAD", "1")
    monkeypatch.setattr(import_set, "_state", {})
    return tmp_path / "cache"


def test_touched_ranges_are_the_pages_this_process_touched(tmp_path):
    path = tmp_path / "lib.so"
    size = 8 * 2**20
    path.write_bytes(os.urandom(size))
    _evict(path)  # cold, as a library is before its import (a file just written sits in 2 MiB folios)
    if _resident(path) > 0.05:
        pytest.skip(f"{tmp_path}: this filesystem keeps evicted pages; the page cache cannot be emptied")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as view:
        _ = view[0], view[size // 2]  # two pages touched, the rest never
        regions = import_set.mapped_libraries()[str(path)]
        ranges = import_set.touched_ranges(regions, size)
    # The fault reads a little around the page, and the kernel maps those neighbours too; the
    # untouched rest of the file is in no range.
    assert len(ranges) == 2, ranges
    (a, n), (b, m) = ranges
    assert a == 0 and 0 < n < import_set.MERGE
    assert b <= size // 2 < b + m and m < import_set.MERGE


def _child(code: str, cache: Path, *args: str) -> subprocess.CompletedProcess:
    """A fresh interpreter that starts the import set for `args`, runs `code`, and records."""
    script = (
        "import sys\nfrom pipeline.loading import import_set\n"
        f"import_set.start({list(args)!r})\n{code}\n"
        "print(import_set.record())\nprint(import_set.summary())"
    )
    env = {**os.environ, "MODEL_LOADER_CACHE": str(cache), "PIPELINE_IMPORT_READAHEAD": "1"}
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, check=True)


def _manifests(cache: Path) -> list[Path]:
    return sorted((cache / "imports").glob("*/*.json"))


def test_a_run_records_its_libraries_and_modules_once(cache):
    out = _child("import numpy, decimal", cache, "quantization=int8", "hydra.run.dir=/tmp/a")
    assert out.stdout.split("\n")[0] == "True"
    (manifest,) = _manifests(cache)
    rows = json.loads(manifest.read_text())
    import numpy

    numpy_libs = [row for row in rows["libs"] if row[0].startswith(os.path.dirname(numpy.__file__))]
    assert numpy_libs, "numpy's extension modules are mapped libraries"
    for path, size, mtime, extents in rows["libs"]:
        assert size == os.path.getsize(path) and mtime == os.stat(path).st_mtime_ns
        assert all(off >= 0 and length > 0 and off + length <= size for off, length in extents)
    names = [Path(m).name for m in rows["modules"]]
    assert any(n.startswith("decimal.") for n in names) and any("/numpy/" in m for m in rows["modules"])
    assert names.index(next(n for n in names if n.startswith("import_set."))) < names.index(
        next(n for n in names if n.startswith("decimal."))
    ), "modules in import order"
    assert rows["bytes"] == sum(n for *_, ext in rows["libs"] for _, n in ext) + sum(
        os.path.getsize(m) for m in rows["modules"]
    )
    # The same command (another run directory): its reader maps the subprocess module's libraries,
    # not in the first record, so it records again; after that nothing new, nothing written.
    second = _child("import numpy, decimal", cache, "quantization=int8", "hydra.run.dir=/tmp/b")
    assert second.stdout.split("\n")[0] == "True" and _manifests(cache) == [manifest]
    third = _child("import numpy, decimal", cache, "quantization=int8", "hydra.run.dir=/tmp/c")
    assert third.stdout.split("\n")[0] == "False" and f"'manifest': '{manifest}'" in third.stdout
    # Another command records its own set beside it.
    _child("import decimal", cache, "quantization=nf4")
    assert len(_manifests(cache)) == 2


def _manifest_of(cache: Path, key_args: list[str], rows: dict) -> Path:
    import_set._state.clear()
    path = Path(import_set.environment_dir()) / (import_set.command_key(key_args) + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def _wait(timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = import_set.summary()
        if done is None or done["read_s"] is not None:
            return done
        time.sleep(0.05)
    raise AssertionError("the import reader did not finish")


def test_start_reads_the_recorded_ranges_into_a_cold_page_cache(cache, tmp_path):
    lib = _cold_file(tmp_path, 16)
    module = tmp_path / "module.pyc"
    module.write_bytes(os.urandom(3 * 2**20))
    _evict(module)
    rows = {"bytes": 11 * 2**20, "libs": [[str(lib), 16 * 2**20, 0, [[0, 4 * 2**20], [12 * 2**20, 4 * 2**20]]]]}
    rows["modules"] = [str(module), str(tmp_path / "gone.pyc")]
    manifest = _manifest_of(cache, ["x=1"], rows)
    import_set.start(["x=1", "hydra.run.dir=elsewhere"])
    done = _wait()
    assert done["manifest"] == str(manifest) and done["files"] == 3 and done["bytes"] == 11 * 2**20
    assert done["read_bytes"] == 11 * 2**20 and done["read_s"] > 0
    assert _resident(module) > 0.99
    recorded = [(0, 4 * 2**20), (12 * 2**20, 4 * 2**20)]
    assert resident_share(str(lib), recorded) > 0.99
    assert resident_share(str(lib), [(5 * 2**20, 6 * 2**20)]) < 0.05, "a range not recorded is left alone"


def test_start_takes_the_latest_command_when_this_one_is_new(cache, tmp_path):
    module = tmp_path / "m.pyc"
    module.write_bytes(b"x" * 4096)
    old = _manifest_of(cache, ["old"], {"bytes": 4096, "libs": [], "modules": [str(module)]})
    newer = _manifest_of(cache, ["newer"], {"bytes": 4096, "libs": [], "modules": [str(module)]})
    os.utime(old, (time.time() - 60, time.time() - 60))
    import_set.start(["never-run"])
    assert _wait()["manifest"] == str(newer)
    import_set._state.clear()
    import_set.start(["old"])
    assert _wait()["manifest"] == str(old), "the command's own set before any other"


def test_nothing_is_read_ahead_without_a_record_when_switched_off_or_too_large(cache, tmp_path, monkeypatch):
    import_set.start(["first-ever"])
    assert import_set.summary() is None
    from pipeline.loading import page_cache

    _manifest_of(cache, ["big"], {"bytes": int(page_cache.available_memory()), "libs": [], "modules": []})
    import_set.start(["big"])
    assert import_set.summary() is None, "more than a quarter of the available memory: not read"
    _manifest_of(cache, ["off"], {"bytes": 1, "libs": [], "modules": []})
    monkeypatch.setenv("PIPELINE_IMPORT_READAHEAD", "0")
    import_set.start(["off"])
    assert import_set.summary() is None and import_set.record() is False


def test_the_cli_records_its_import_set_and_reads_it_ahead_the_next_time(cache, tiny, tmp_path):
    ckpt = tiny("llama")
    first = run_cli(f"checkpoint.path={ckpt}", "quantization=none", f"hydra.run.dir={tmp_path / 'one'}")
    assert first.returncode == 0, first.stderr
    assert json.loads((tmp_path / "one" / "report.json").read_text())["load"]["imports_read_ahead"] is None
    (manifest,) = _manifests(cache)
    rows = json.loads(manifest.read_text())
    import torch

    torch_lib = os.path.dirname(torch.__file__)
    assert any(path.startswith(torch_lib) and extents for path, _, _, extents in rows["libs"]), "torch's libraries"
    assert any("/transformers/" in m for m in rows["modules"]) and any("/hydra/" in m for m in rows["modules"])
    second = run_cli(f"checkpoint.path={ckpt}", "quantization=none", f"hydra.run.dir={tmp_path / 'two'}")
    assert second.returncode == 0, second.stderr
    ahead = json.loads((tmp_path / "two" / "report.json").read_text())["load"]["imports_read_ahead"]
    assert ahead["manifest"] == str(manifest) and ahead["files"] == len(rows["libs"]) + len(rows["modules"])
    assert ahead["bytes"] == rows["bytes"] > 0
    assert ahead["read_s"] is None or ahead["read_bytes"] > 0
