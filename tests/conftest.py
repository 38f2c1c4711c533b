"""Shared fixtures (the helpers they use live in tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Every metric measured fresh unless a test asks for the cache (tests/test_metric_cache.py).
os.environ.setdefault("MODEL_LOADER_METRICS_CACHE", "off")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny("llama") -> path of a sharded checkpoint (built once per session and dtype)."""
    cache: dict = {}

    def get(arch: str, dtype=torch.float32) -> Path:
        key = (arch, dtype)
        if key not in cache:
            cache[key] = make_checkpoint(arch, tmp_path_factory.mktemp(f"{arch}_{str(dtype)[6:]}"), dtype)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """saved("mixtral") -> a tiny model of that family (tests/architectures.py) saved by save_pretrained, once."""
    from architectures import BY_FAMILY, build

    cache: dict = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build(BY_FAMILY[family], tmp_path_factory.mktemp(family))
        return cache[family]

    return get


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def tmpfs(tmp_path):
    """tmpfs("size=64k") -> a real filesystem of that size, mounted for the test (mount(8) needs root: skipped
    where it cannot mount), unmounted afterwards: a full or read-only disk without mocks."""
    import subprocess

    mounts = []

    def make(options: str = "size=64k") -> Path:
        point = tmp_path / f"tmpfs{len(mounts)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[:200]}")
        mounts.append(point)
        return point

    yield make
    for point in mounts:
        subprocess.run(["umount", str(point)], check=False)
