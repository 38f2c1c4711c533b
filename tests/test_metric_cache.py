"""The validation-metric cache (pipeline/measure/cache.py): a hit on an unchanged load gives the very
same metrics, anything that changes them (a shard, the dtype, the eval text) is a miss, and the
checks that prove the load run either way."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import tree_digest

from pipeline import load


def _tokenizer(dest):
    """A real byte-level tokenizer with exactly the tiny models' 256 ids (no merges), saved beside the weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sorted(alphabet)[0])
    fast.save_pretrained(dest)


@pytest.fixture
def ck(tiny, tmp_path):
    """A private copy of the tiny Llama (bf16) with a tokenizer: perplexity, greedy and the reference all run."""
    dest = tmp_path / "ck"
    shutil.copytree(tiny("llama", torch.bfloat16), dest)
    _tokenizer(dest)
    return dest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "metrics_cache"
    monkeypatch.setenv("MODEL_LOADER_METRICS_CACHE", str(root))
    return root


def _run(ck, run_dir, *extra):
    r = load(
        [f"checkpoint.path={ck}", "quantization=int8", "stages.validate.max_eval_tokens=64", *extra], run_dir=run_dir
    )
    return r.report["validation"]


def _cached(v) -> dict:
    return {k: e["cached"] for k, e in v["metric_costs"].items()}


def test_hit_on_unchanged_checkpoint_gives_identical_metrics(ck, cache, tmp_path):
    before = tree_digest(ck)
    first = _run(ck, tmp_path / "a")
    assert _cached(first) == {"forward": False, "perplexity": False, "reference": False, "greedy": False}
    second = _run(ck, tmp_path / "b")
    assert _cached(second) == {"forward": False, "perplexity": True, "reference": True, "greedy": True}
    first_m = {k: v for k, v in first["metrics"].items() if k != "forward_tokens_per_s"}
    second_m = {k: v for k, v in second["metrics"].items() if k != "forward_tokens_per_s"}
    assert first_m == second_m
    assert {"perplexity", "reference_perplexity", "logits_rel_error", "continuation"} <= set(second_m)
    assert second["checks"] == first["checks"] and all(second["checks"].values())  # the checks always run
    assert all(e["seconds"] >= 0 for e in second["metric_costs"].values())
    assert tree_digest(ck) == before  # nothing written into the checkpoint
    assert list((cache / "reference").glob("*.pt")) and list((cache / "model").glob("*.json"))


def test_changed_shard_is_a_miss(ck, cache, tmp_path):
    from safetensors.torch import load_file, save_file

    first = _run(ck, tmp_path / "a")
    shard = sorted(ck.glob("model-*.safetensors"))[-1]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 2
    save_file(tensors, shard, metadata={"format": "pt"})
    second = _run(ck, tmp_path / "b")
    assert _cached(second) == {"forward": False, "perplexity": False, "reference": False, "greedy": False}
    assert second["metrics"]["reference_perplexity"] != first["metrics"]["reference_perplexity"]


def test_dtype_change_is_a_miss_and_the_old_entry_still_hits(ck, cache, tmp_path):
    _run(ck, tmp_path / "a")
    other = _run(ck, tmp_path / "b", "quantization.unquantized_dtype=null")  # everything else bf16, not fp32
    assert not any(_cached(other).values())
    again = _run(ck, tmp_path / "c")
    assert _cached(again)["reference"] and _cached(again)["perplexity"]


def test_eval_text_change_is_a_miss(ck, cache, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    first = _run(ck, tmp_path / "a", f"stages.validate.eval_text={text}")
    text.write_text("An entirely different evaluation text, of another length. " * 3)
    second = _run(ck, tmp_path / "b", f"stages.validate.eval_text={text}")
    assert _cached(second)["perplexity"] is False and _cached(second)["reference"] is False
    assert second["metrics"]["perplexity"] != first["metrics"]["perplexity"]
    assert _cached(second)["greedy"] is False  # the loaded model's entry is keyed by the text too


def test_cache_off_writes_nothing(ck, tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_LOADER_METRICS_CACHE", "off")
    v = _run(ck, tmp_path / "a")
    v2 = _run(ck, tmp_path / "b")
    assert not any(_cached(v2).values())
    assert v["metrics"]["reference_perplexity"] == v2["metrics"]["reference_perplexity"]
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert set(report["validation"]["metric_costs"]) == {"forward", "perplexity", "reference", "greedy"}
