"""Save never destroys what it did not write, and replacing a save is atomic (issue 28).

A destination that is, holds or lies inside the checkpoint or the run directory is refused;
only a directory our save wrote (its mark) is replaced, by renames, so a real save process
killed with SIGKILL at any phase leaves the old or the new save complete, and the next save
cleans up what the kill left."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, tree_digest

from pipeline import load
from pipeline.checkpoint.save_mark import MARK, is_complete, read_mark
from pipeline.errors import UserError

FAST_SAVE = "stages=[instantiate_empty,plan,quantize,load_shards,save]"


def _save(src, dest, run_dir, *extra):
    return load([f"checkpoint.path={src}", FAST_SAVE, f"stages.save.path={dest}", *extra], run_dir=run_dir)


def _leftovers(dest: Path) -> list[str]:
    return sorted(
        p.name for p in dest.parent.iterdir() if p.name.startswith((f".save-{dest.name}-", f".old-{dest.name}-"))
    )


@pytest.mark.parametrize("where", ["parent", "itself", "symlink to the parent"])
def test_save_refuses_a_destination_holding_the_checkpoint_even_with_overwrite(where, tiny, tmp_path):
    parent = tmp_path / "models"
    src = parent / "llama"
    shutil.copytree(tiny("llama"), src)
    dest = {"parent": parent, "itself": src, "symlink to the parent": tmp_path / "link"}[where]
    if where == "symlink to the parent":
        os.symlink(parent, dest)
    before = tree_digest(parent)
    with pytest.raises(
        UserError, match=r"stages.save.path: .* (contains the source checkpoint|is the source checkpoint)"
    ):
        _save(src, dest, tmp_path / "run", "stages.save.overwrite=true")
    assert tree_digest(parent) == before


@pytest.mark.parametrize("where", ["holds", "inside", "is"])
def test_save_refuses_the_run_directory(where, tiny, tmp_path):
    run_dir = tmp_path / "out" / "run"
    dest = {"holds": tmp_path / "out", "inside": run_dir / "int8", "is": run_dir}[where]
    with pytest.raises(UserError, match=r"stages.save.path: .* the run directory"):
        _save(tiny("llama"), dest, run_dir, "stages.save.overwrite=true")
    assert not (run_dir / "int8").exists()


def test_overwrite_never_replaces_a_directory_we_did_not_write(tiny, tmp_path):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    for flag in ("true", "false"):
        with pytest.raises(UserError, match="was not written by a save") as err:
            _save(tiny("llama"), dest, tmp_path / "run", f"stages.save.overwrite={flag}")
        assert "stages.save.overwrite" not in str(err.value) and str(dest) in str(err.value)
    assert (dest / "keep.txt").read_text() == "mine" and _leftovers(dest) == []


def test_overwrite_never_replaces_a_save_holding_a_file_of_yours(tiny, tmp_path):
    dest = tmp_path / "int8"
    _save(tiny("llama"), dest, tmp_path / "a")
    (dest / "notes.md").write_text("mine")
    with pytest.raises(UserError, match=r"holds notes.md \(not written by the save\)") as err:
        _save(tiny("llama"), dest, tmp_path / "b", "stages.save.overwrite=true")
    assert "stages.save.overwrite" not in str(err.value)
    assert (dest / "notes.md").read_text() == "mine" and is_complete(str(dest), read_mark(str(dest)))


def test_overwrite_replaces_an_earlier_save_and_leaves_nothing_beside_it(tiny, tmp_path):
    dest = tmp_path / "int8"
    _save(tiny("llama"), dest, tmp_path / "a")
    with pytest.raises(UserError, match=r"an earlier save\); set stages.save.overwrite=true"):
        _save(tiny("llama"), dest, tmp_path / "b")
    _save(tiny("llama"), dest, tmp_path / "c", "quantization=none", "stages.save.overwrite=true")
    assert is_complete(str(dest), read_mark(str(dest))) and _leftovers(dest) == []
    assert load([f"checkpoint.path={dest}", "quantization=none"], run_dir=tmp_path / "d").report["status"] == "ok"


def _killed_save(src: Path, dest: Path, run_dir: Path, phase: str) -> None:
    """A real `python -m pipeline` save with overwrite, SIGKILLed at `phase`: `writing` by watching the
    filesystem for its first shard; the instants between renames by the crash-test pause point."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MODEL_LOADER_METRICS_CACHE": "off"}
    if phase != "writing":
        env["PIPELINE_TEST_SAVE_PAUSE"] = phase
    args = [f"checkpoint.path={src}", FAST_SAVE, f"stages.save.path={dest}", "stages.save.overwrite=true"]
    args += ["quantization=none", f"hydra.run.dir={run_dir}", "stages.save.max_shard_mib=4"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        if phase == "writing":
            _wait_for(lambda: any(dest.parent.glob(f".save-{dest.name}-*/model-00001-of-*.safetensors")), proc)
        else:
            for line in proc.stderr:
                if f"save paused at {phase}" in line:
                    break
            else:
                raise AssertionError(f"the save ended before {phase} (exit {proc.wait()})")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _wait_for(condition, proc, timeout=300.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the save ended first (exit {proc.returncode})"
        assert time.monotonic() < end, "timed out"
        time.sleep(0.0005)


def _big_checkpoint(dest: Path) -> Path:
    """144 MB of fp32 Llama in 4 MiB shards: writing its save takes long enough to be caught in the act."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(dest, max_shard_size="20MB")
    return dest


@pytest.mark.parametrize("phase", ["writing", "written", "swapped", "removing"])
def test_a_save_killed_at_any_phase_leaves_a_complete_save_and_the_next_one_cleans_up(phase, tiny, tmp_path):
    dest = tmp_path / "saved"
    _save(tiny("llama"), dest, tmp_path / "a")  # the earlier save (int8)
    earlier = tree_digest(dest)
    src = _big_checkpoint(tmp_path / "big") if phase == "writing" else tiny("llama")
    _killed_save(src, dest, tmp_path / "b", phase)
    left = [dest.parent / n for n in _leftovers(dest)]
    if phase == "swapped":  # between the renames: the earlier save, complete, aside
        assert not dest.exists()
        assert [tree_digest(p) for p in left if p.name.startswith(".old-")] == [earlier]
    elif phase == "removing":  # the new save in place, the earlier one half removed (its mark still there)
        assert tree_digest(dest) != earlier and is_complete(str(dest), read_mark(str(dest)))
        assert [p.name.startswith(".old-") and (p / MARK).exists() for p in left] == [True]
    else:  # writing or written: the earlier save untouched, the new one beside it
        assert tree_digest(dest) == earlier and [p.name.startswith(".save-") for p in left] == [True]
    _save(tiny("llama"), dest, tmp_path / "c", "stages.save.overwrite=true")
    assert _leftovers(dest) == [] and is_complete(str(dest), read_mark(str(dest)))


def test_a_disk_too_small_is_refused_before_writing(tmpfs, tiny, tmp_path):
    disk = tmpfs("size=64k")
    with pytest.raises(UserError, match=rf"stages.save.path: {disk} has [0-9.]+ MiB free; the save needs \d+ bytes"):
        _save(tiny("llama"), disk / "int8", tmp_path / "run")
    assert list(disk.iterdir()) == []


def test_running_out_of_space_while_writing_is_one_line_and_leaves_nothing(tmpfs, tiny, tmp_path):
    """Free bytes, but no inode for the index after the shard: ENOSPC mid-save, which no free-space check foresees."""
    disk = tmpfs("size=16m,nr_inodes=4")
    with pytest.raises(
        UserError, match=rf"stages.save.path: {disk} ran out of space while writing; the save needs \d+"
    ):
        _save(tiny("llama"), disk / "int8", tmp_path / "run")
    assert list(disk.iterdir()) == []


def test_a_save_killed_mid_shard_is_cleaned_up_but_a_stranger_file_is_not(tmp_path):
    """safetensors writes a shard to `.tmpXXXXXX` beside it and renames it: a save killed mid-shard leaves that
    file in its `.save-` directory (seen in the full suite), and the next save removes the directory. A file
    of any other name there, or the same name once the mark says complete, is not ours: it stays."""
    from pipeline.checkpoint.save_mark import write_mark
    from pipeline.checkpoint.swap import recover

    dest = tmp_path / "saved"
    killed, stranger = tmp_path / ".save-saved-aaaa", tmp_path / ".save-saved-bbbb"
    for folder, extra in ((killed, ".tmprIlU1g"), (stranger, "notes.txt")):
        folder.mkdir()
        write_mark(str(folder), "writing", {"model-00001-of-00002.safetensors": None})
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"x" * 8)
        (folder / extra).write_bytes(b"partial shard")
    notes = recover(str(dest))
    assert not killed.exists(), notes
    assert stranger.exists() and (stranger / "notes.txt").exists()
    assert any("notes.txt (not written by the save)" in n for n in notes)
