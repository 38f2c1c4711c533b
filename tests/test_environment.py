"""The environment is the lock: the README's test command installs exactly constraints.txt.

A fresh machine that runs `bash scripts/setup.sh` gets every locked package at its locked version,
so CI and the README's figures cannot move under us when a dependency releases. scripts/compat.sh
builds venvs with one package moved; it names what it moved in MODEL_LOADER_LOCK_MOVED.
"""

from __future__ import annotations

import os
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from helpers import REPO

LOCK = REPO / "constraints.txt"


def _locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_canonical(name)] = version
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _made_by_setup() -> bool:
    """This interpreter runs in a venv that scripts/setup.sh (or scripts/compat.sh) made from the lock."""
    return Path(sys.prefix, ".setup-stamp").is_file()


def test_the_lock_pins_every_dependency_exactly():
    pins = _locked()
    for needed in (
        "torch",
        "transformers",
        "accelerate",
        "bitsandbytes",
        "safetensors",
        "hydra-core",
        "omegaconf",
        "huggingface-hub",
        "tokenizers",
        "gguf",
        "peft",
        "ray",
        "submitit",
        "numpy",
    ):
        assert pins.get(needed), f"constraints.txt does not pin {needed}"
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.]*", v) for v in pins.values()), "every pin is one exact version"


@pytest.mark.skipif(not _made_by_setup(), reason="runs in a venv made by scripts/setup.sh from the lock")
def test_installed_versions_equal_the_lock():
    moved = {_canonical(n) for n in os.environ.get("MODEL_LOADER_LOCK_MOVED", "").split()}
    installed = {_canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {
        name: (version, installed.get(name))
        for name, version in _locked().items()
        if name not in moved and installed.get(name, "").split("+")[0] != version
    }
    assert not wrong, f"installed versions differ from constraints.txt (locked, installed): {wrong}"


def test_the_report_names_what_the_run_depended_on(tiny, tmp_path):
    """report.json `environment`: every package version, the CPU path torch chose, bitsandbytes' backend."""
    import torch

    from pipeline import load

    result = load([f"checkpoint.path={tiny('llama')}", "quantization=int8"], run_dir=tmp_path / "run")
    env = result.report["environment"]
    for name in ("torch", "transformers", "accelerate", "safetensors", "bitsandbytes", "hydra-core", "omegaconf"):
        assert env["packages"][name] == metadata.version(name)
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["bitsandbytes_backend"] and env["bitsandbytes_backend"].startswith("cpu")
    assert env["transformers_tested"]["in_range"] is True
