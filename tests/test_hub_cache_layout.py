"""Checkpoints as the Hugging Face hub cache keeps them: snapshots/<rev>/ files are relative symlinks into
../../blobs/<sha256>. They load, one file or many shards, under one rule (an index entry names a file
inside the directory; the file may be a symlink to anywhere), and nothing in the cache is written."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from helpers import assert_same_tensors, hub_cache_snapshot, run_cli, tree_digest

from pipeline import load
from pipeline.errors import UserError

SAVE = "stages=[instantiate_empty,plan,quantize,load_shards,validate,save]"


def _read_only(tree: Path) -> None:
    """Take write permission away from every directory and blob: a write anywhere in the cache would fail."""
    for p in sorted(tree.rglob("*"), reverse=True):
        if not p.is_symlink():
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    tree.chmod(tree.stat().st_mode & ~stat.S_IWUSR)


def _writable(tree: Path) -> None:
    tree.chmod(tree.stat().st_mode | stat.S_IWUSR)
    for p in tree.rglob("*"):
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


@pytest.fixture
def cache(tmp_path):
    yield tmp_path / "hub"
    if (tmp_path / "hub").exists():
        _writable(tmp_path / "hub")


def test_snapshots_load_read_only_one_file_or_many_as_transformers_loads_them(tiny, cache, tmp_path):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache
    from transformers import AutoModelForCausalLM

    snapshot = hub_cache_snapshot(tiny("llama"), cache)
    assert len(list(snapshot.glob("*.safetensors"))) >= 3
    assert [r.repo_id for r in scan_cache_dir(cache).repos] == ["tiny/llama"]  # huggingface_hub reads our layout
    assert Path(try_to_load_from_cache("tiny/llama", "config.json", cache_dir=cache)) == snapshot / "config.json"
    _read_only(cache)
    before = tree_digest(cache)
    ours = load([f"checkpoint.path={snapshot}", "quantization=none", "dtype=fp32"], run_dir=tmp_path / "run")
    assert ours.report["status"] == "ok" and ours.report["checkpoint"]["files"] >= 3
    theirs = AutoModelForCausalLM.from_pretrained("tiny/llama", cache_dir=cache, dtype=torch.float32)
    assert assert_same_tensors(ours.model, theirs) > 0
    assert tree_digest(cache) == before  # blobs, symlinks and refs as they were
    _single_file_snapshot_loads(tmp_path, cache)


def _single_file_snapshot_loads(tmp_path, cache):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "src"
    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(src)  # one model.safetensors, as small models come
    assert (src / "model.safetensors").exists() and not (src / "model.safetensors.index.json").exists()
    _writable(cache)
    snapshot = hub_cache_snapshot(src, cache, "tiny/gpt2")
    _read_only(cache)
    before = tree_digest(cache)
    p = run_cli("checkpoint=hf_dir", f"checkpoint.path={snapshot}", f"hydra.run.dir={tmp_path / 'cli'}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "cli" / "report.json").read_text())["checkpoint"]["files"] == 1
    assert tree_digest(cache) == before


def test_one_rule_for_one_file_or_many(tiny, tmp_path):
    """A shard symlinked from elsewhere loads like a symlinked single file; only the index's names are bounded."""
    elsewhere = tmp_path / "other_disk"
    elsewhere.mkdir()
    ck = tmp_path / "ck"
    ck.mkdir()
    for f in tiny("llama").iterdir():
        target = elsewhere / f.name
        target.write_bytes(f.read_bytes())
        os.symlink(target, ck / f.name)  # absolute symlinks out of the directory
    assert load([f"checkpoint.path={ck}", "quantization=none"], run_dir=tmp_path / "run").report["status"] == "ok"
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    for bad, why in ((f"../other_disk/{index['weight_map'][first]}", "'..'"), (str(elsewhere / "x"), "absolute")):
        broken = tmp_path / f"bad_{why.strip(chr(39))}"
        broken.mkdir()
        for f in ck.iterdir():
            os.symlink(os.readlink(f), broken / f.name) if f.name != "model.safetensors.index.json" else None
        index["weight_map"][first] = bad
        (broken / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(UserError, match=f"entry for '{first}'.*{why}"):
            load([f"checkpoint.path={broken}", "quantization=none"], run_dir=tmp_path / "run_bad")


def test_save_refuses_the_blobs_its_symlinks_lead_to(tiny, cache, tmp_path):
    snapshot = hub_cache_snapshot(tiny("llama"), cache)
    before = tree_digest(cache)
    dest = snapshot.parents[1] / "blobs" / "int8"
    with pytest.raises(UserError, match="stages.save.path: .* is inside the source checkpoint .*blobs"):
        load([f"checkpoint.path={snapshot}", SAVE, f"stages.save.path={dest}"], run_dir=tmp_path / "run")
    assert not dest.exists() and tree_digest(cache) == before
