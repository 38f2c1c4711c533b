"""The command as users reach it: `model-loader --help`, `--version` and bash completion, in real subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from helpers import REPO, run_cli

import pipeline.conf

MODEL_LOADER = Path(sys.executable).parent / "model-loader"  # the console script pyproject installs
CONF = Path(pipeline.conf.__file__).parent  # the config package, wherever it lives

pytestmark = pytest.mark.skipif(not MODEL_LOADER.exists(), reason="the package is not installed in this venv")


def _model_loader(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([str(MODEL_LOADER), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_help_lists_groups_with_choices_and_keys_with_defaults():
    proc = _model_loader("--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("model-loader:") and "Usage: model-loader" in out
    groups = dict(line.split(None, 1) for line in out.split("Config groups")[1].split("\n\n")[0].splitlines()[1:])
    presets = sorted(p.stem for p in (CONF / "quantization").glob("*.yaml"))
    shown = [p + "*" if p == "int8" else p for p in presets if not p.startswith("_")]
    assert groups["quantization"].split(", ") == shown  # the YAML presets; internals (_schema, _base) never
    assert not any(c.startswith("_") for line in groups.values() for c in line.split(", "))
    assert "auto*" in groups["dtype"] and "smollm2*" in groups["checkpoint"] and "hydra" not in groups
    assert "  quantization.threshold = 6.0" in out and "  checkpoint.path = null" in out  # from the composed config
    assert "--config-dir /path/to/conf --config-name myjob" in out


def test_help_follows_the_overrides_and_a_config_dir(tmp_path):
    (tmp_path / "dtype").mkdir()
    (tmp_path / "dtype" / "mine.yaml").write_text("name: bf16\noverrides: null\n")
    (tmp_path / "myjob.yaml").write_text("defaults:\n  - config\n  - _self_\n")
    proc = _model_loader("--config-dir", str(tmp_path), "--config-name", "myjob", "quantization=nf4", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "mine" in proc.stdout.split("\n  dtype")[1].splitlines()[0]
    assert "nf4*" in proc.stdout and "int8*" not in proc.stdout


def test_help_for_a_bad_override_is_one_line_and_exit_2():
    proc = _model_loader("dtype=bfloat16", "--help")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


def test_version_names_ours_torch_and_transformers_and_exits_0():
    for proc in (_model_loader("--version"), run_cli("--version")):
        assert proc.returncode == 0, proc.stderr
        line = proc.stdout.strip()
        assert line.startswith(f"model-loader {version('hydra-model-loader')} (")
        assert f"torch {version('torch')}" in line and f"transformers {version('transformers')}" in line


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completion_is_registered_for_model_loader_and_completes_groups():
    script = (
        'eval "$(model-loader -sc install=bash)"\n'
        "complete -p model-loader\n"
        'COMP_LINE="model-loader quantiz"; COMP_WORDS=(model-loader quantiz); COMP_CWORD=1\n'
        'COMP_POINT=${#COMP_LINE}; hydra_bash_completion; echo "${COMPREPLY[@]}"\n'
        'COMP_LINE="model-loader quantization="; COMP_WORDS=(model-loader quantization=); COMP_CWORD=1\n'
        'COMP_POINT=${#COMP_LINE}; hydra_bash_completion; echo "${COMPREPLY[@]}"\n'
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{MODEL_LOADER.parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    registered, groups, choices = proc.stdout.strip().splitlines()[-3:]
    assert registered.startswith("complete ") and registered.split()[-1] == "model-loader"
    assert "python" not in registered
    assert "quantization=" in groups.split()
    presets = {p.stem for p in (CONF / "quantization").glob("*.yaml") if not p.stem.startswith("_")}
    assert set(choices.split()) == {f"quantization={p}" for p in presets} and "int8" in presets


def test_completion_from_python_dash_m_points_to_model_loader():
    # Registering completion for `python -m pipeline` would take over bash's completion of `python` itself.
    proc = run_cli("-sc", "install=bash")
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        proc.stderr.strip()
        == 'error: -sc: shell completion is for the model-loader command; run: eval "$(model-loader -sc install=bash)"'
    )
