"""Issue 29: incomplete input is exit 2 at plan time (dry run included), unless partial loading is asked for.

Model tensors without a source are named (the first few, with a count) with the file or index entry
that should hold them; `checkpoint.allow_missing=true` initialises them as transformers does and lists
them (transformers' `missing_keys`); an empty or blank `checkpoint.path` never falls back to the
built-in model. Keys transformers initialises itself (`_keys_to_ignore_on_load_missing`) pass.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from architectures import Arch, build

from pipeline import load
from pipeline.errors import UserError

DRY = "+experiment=dry_run"
NO_METRICS = [f"stages.validate.metrics.{m}=false" for m in ("perplexity", "reference", "greedy", "throughput")]


def _without(src, dest, drop):
    """A copy of a sharded checkpoint whose index no longer lists the keys `drop` selects."""
    shutil.copytree(src, dest)
    index_path = dest / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    gone = sorted(k for k in index["weight_map"] if drop(k))
    for k in gone:
        del index["weight_map"][k]
    index_path.write_text(json.dumps(index))
    return dest, gone


def test_one_shard_of_several_is_exit_2_naming_the_other_shards(tiny, tmp_path):
    src = tiny("llama")
    part = tmp_path / "part"
    part.mkdir()
    first = sorted(src.glob("model-*.safetensors"))[0]
    shutil.copy(src / "config.json", part)
    shutil.copy(first, part)
    with pytest.raises(UserError) as err:
        load([f"checkpoint.path={part / first.name}", DRY], run_dir=tmp_path / "r")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("checkpoint: ") and "model tensors have no source" in msg and "more)" in msg
    assert f"is shard 1 of {len(list(src.glob('model-*.safetensors')))}" in msg and "checkpoint.allow_missing" in msg
    with pytest.raises(UserError, match="no model.safetensors.index.json, which says which shard"):
        load([f"checkpoint.path={part}", DRY], run_dir=tmp_path / "d")  # the shard alone in a directory


def test_tensors_missing_from_the_index_are_named_with_the_index(tiny, tmp_path):
    ck, gone = _without(tiny("llama"), tmp_path / "ck", lambda k: k.startswith("model.layers.2."))
    with pytest.raises(UserError) as err:
        load([f"checkpoint.path={ck}", DRY], run_dir=tmp_path / "r")
    msg = str(err.value)
    assert f"{len(gone)} model tensors have no source: model.layers.2." in msg
    assert "model.safetensors.index.json has no weight_map entry for them" in msg


@pytest.mark.parametrize("value", ["", "' '"])
def test_empty_checkpoint_path_is_exit_2_not_the_builtin_model(value, tmp_path):
    with pytest.raises(UserError, match=r"^checkpoint.path: empty \("):
        load([f"checkpoint.path={value}", DRY], run_dir=tmp_path / "r")


@pytest.mark.parametrize("method", ["none", "int8"])
def test_allow_missing_initialises_and_lists_them(method, tiny, tmp_path):
    ck, gone = _without(tiny("llama"), tmp_path / "ck", lambda k: k.startswith("model.layers.2.mlp."))
    r = load(
        [f"checkpoint.path={ck}", f"quantization={method}", "checkpoint.allow_missing=true", *NO_METRICS],
        run_dir=tmp_path / "r",
    )
    report = r.report
    assert sorted(report["load"]["missing_keys"]) == gone
    assert all(report["validation"]["checks"].values()), report["validation"]["checks"]
    assert set(report["validation"]["plan_error"].values()) == {0.0}
    down = r.model.model.layers[2].mlp.down_proj.weight
    assert down.device.type == "cpu" and torch.isfinite(down).all() and down.std() > 0  # _init_weights' normal
    if method == "int8":  # a layer whose weight is missing is initialised, not quantized
        reason = report["quantization"]["skipped_reasons"]["model.layers.2.mlp.down_proj"]
        assert "missing from the checkpoint" in reason
        assert type(r.model.model.layers[1].mlp.down_proj).__name__ == "Linear8bitLt"


MARIAN = Arch(
    "marian",
    "MarianConfig",
    "MarianMTModel",
    dict(
        vocab_size=128,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=32,
        decoder_start_token_id=0,
        pad_token_id=0,
    ),
)


def test_keys_transformers_initialises_itself_pass_without_the_opt_in(tmp_path):
    """Marian's sinusoidal position tables are in its `_keys_to_ignore_on_load_missing` and save_pretrained
    leaves them out: such a complete checkpoint loads without the opt-in, with the tables transformers computes."""
    from transformers import MarianMTModel

    ck = build(MARIAN, tmp_path / "src", shards=2)
    index = json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"]
    tables = ["model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"]
    assert not set(tables) & set(index)  # not in the files: transformers makes them
    r = load([f"checkpoint.path={ck}", "quantization=int8", *NO_METRICS], run_dir=tmp_path / "r")
    assert all(r.report["validation"]["checks"].values()), r.report["validation"]["checks"]
    theirs = MarianMTModel.from_pretrained(ck).eval()
    for name in tables:
        assert torch.equal(r.model.get_parameter(name), theirs.get_parameter(name)), name
        assert r.model.get_parameter(name).abs().sum() > 0
