"""Nothing is written into the checkpoint directory in any configuration (issue 28): a run directory,
metric cache or model-loader cache inside it, or a working directory inside it with the relative
default run directory, is exit 2 naming the key, before anything is written (the real CLI)."""

import os
import shutil
from pathlib import Path

import pytest
from helpers import run_cli

from pipeline import load
from pipeline.errors import UserError


def _snapshot(root: Path) -> dict:
    """Every entry's name, size and mtime, the directories' own included: a file added, removed or touched shows."""
    out = {".": root.stat().st_mtime_ns}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def ck(tiny, tmp_path) -> Path:
    dest = tmp_path / "ck"
    shutil.copytree(tiny("llama"), dest)
    return dest


REV = "0123456789abcdef0123456789abcdef01234567"


def _hub_snapshot(ck: Path, root: Path) -> Path:
    """The layout huggingface_hub writes: snapshot entries are relative symlinks into blobs/, refs/main."""
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(REV)
    snapshot = root / "snapshots" / REV
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(ck.iterdir())):
        (root / "blobs" / f"b{i}").write_bytes(f.read_bytes())
        os.symlink(f"../../blobs/b{i}", snapshot / f.name)
    return snapshot


CASES = {
    "run dir inside": ("hydra.run.dir", lambda ck: ([f"hydra.run.dir={ck}/run"], {}, None)),
    "run dir is it": ("hydra.run.dir", lambda ck: ([f"hydra.run.dir={ck}"], {}, None)),
    "cwd inside, relative run dir": ("hydra.run.dir", lambda ck: (["checkpoint.path=."], {}, ck)),
    "sweep dir inside": ("hydra.sweep.dir", lambda ck: (["-m", f"hydra.sweep.dir={ck}/sweep"], {}, None)),
    "metric cache": ("MODEL_LOADER_METRICS_CACHE", lambda ck: ([], {"MODEL_LOADER_METRICS_CACHE": str(ck)}, None)),
    "model-loader cache": ("MODEL_LOADER_CACHE", lambda ck: ([], {"MODEL_LOADER_CACHE": f"{ck}/cache"}, None)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_nothing_is_written_into_the_checkpoint(case, ck, tmp_path, monkeypatch):
    key, make = CASES[case]
    args, env, cwd = make(ck)
    if "checkpoint.path=." not in args:
        args = [f"checkpoint.path={ck}", *args]
    if key != "hydra.run.dir" and not any(a.startswith("hydra.") for a in args):
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    before = _snapshot(ck)
    proc = run_cli(*args, cwd=cwd)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}: ") and "inside the checkpoint directory" in lines[0]
    assert _snapshot(ck) == before


def test_nothing_is_written_where_the_checkpoint_symlinks_lead(ck, tmp_path):
    snapshot = _hub_snapshot(ck, tmp_path / "hub")
    blobs = tmp_path / "hub" / "blobs"
    before = _snapshot(tmp_path / "hub")
    proc = run_cli(f"checkpoint.path={snapshot}", f"hydra.run.dir={blobs}/run")
    assert proc.returncode == 2 and f"inside the checkpoint directory {blobs}" in proc.stderr, proc.stderr
    assert _snapshot(tmp_path / "hub") == before


def test_nothing_is_written_into_a_hub_repo_ids_snapshot(ck, tmp_path, monkeypatch):
    """checkpoint.path as a repo id resolves to its cached snapshot before the check, as the load resolves it."""
    snapshot = _hub_snapshot(ck, tmp_path / "hub" / "models--tiny--llama")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    before = _snapshot(tmp_path / "hub")
    proc = run_cli("checkpoint.path=tiny/llama", f"hydra.run.dir={snapshot}/run")
    assert proc.returncode == 2 and f"error: hydra.run.dir: {snapshot}/run is inside" in proc.stderr, proc.stderr
    assert _snapshot(tmp_path / "hub") == before


def test_load_refuses_a_run_dir_inside_the_checkpoint(ck):
    before = _snapshot(ck)
    with pytest.raises(UserError, match=r"^run_dir: .* is inside the checkpoint directory"):
        load([f"checkpoint.path={ck}"], run_dir=ck / "run")
    assert _snapshot(ck) == before
