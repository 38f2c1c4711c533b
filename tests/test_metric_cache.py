"""The validation-metric cache (pipeline/measure/cache.py): a hit on an unchanged load gives the very
same metrics, anything that changes them (a shard, the dtype, the eval text) is a miss, and the
checks that prove the load run either way."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct

import pytest
import torch
from helpers import run_cli, tree_digest

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
    other = _run(ck, tmp_path / "b", "quantization.unquantized_dtype=fp16")  # everything else fp16: not the default
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


def test_heldout_perplexity_is_measured_keyed_and_cached(ck, cache, tmp_path):
    """metrics.heldout: the held-out text's perplexity for the loaded model and the reference, the same figure a
    direct measurement gives, cached under a key that holds the held-out text (changing it is a miss), and off by
    default (a run without it reports none and keeps its old key)."""
    from pipeline.measure import quality

    plain = _run(ck, tmp_path / "plain")
    assert "heldout_perplexity" not in plain["metrics"] and "heldout_perplexity" not in _cached(plain)
    text = tmp_path / "heldout.txt"
    text.write_text("A held-out text that no budget saw, about rivers and bridges. " * 3)
    on = ["stages.validate.metrics.heldout=true", f"stages.validate.heldout_text={text}"]
    r = load([f"checkpoint.path={ck}", "quantization=int8", "stages.validate.max_eval_tokens=64", *on],
             run_dir=tmp_path / "a")  # fmt: skip
    m = r.report["validation"]["metrics"]
    tokenizer = quality.load_tokenizer(str(ck))
    with quality.measuring(r.model, True):  # validate measures int8 on the CPU portably
        direct = round(quality.perplexity(r.model, tokenizer, text.read_text(), 64), 4)
    assert m["heldout_perplexity"] == direct != m["perplexity"]
    assert m["reference_heldout_perplexity"] > 0 and m["reference_heldout_perplexity"] != m["reference_perplexity"]
    again = _run(ck, tmp_path / "b", *on)
    assert _cached(again)["heldout_perplexity"] is True and _cached(again)["reference"] is True
    assert again["metrics"]["heldout_perplexity"] == m["heldout_perplexity"]
    text.write_text("Another held-out text entirely, of a different length. " * 2)
    changed = _run(ck, tmp_path / "c", *on)
    assert _cached(changed)["heldout_perplexity"] is False and _cached(changed)["reference"] is False
    assert changed["metrics"]["heldout_perplexity"] != m["heldout_perplexity"]
    assert _cached(_run(ck, tmp_path / "d"))["perplexity"] is True  # the run without it still hits its own entry


def test_heldout_on_an_unquantized_load_is_its_own_reference(ck, cache, tmp_path):
    r = load([f"checkpoint.path={ck}", "quantization=none", "stages.validate.max_eval_tokens=64", "stages.validate.metrics.heldout=true"],
             run_dir=tmp_path / "a")  # fmt: skip
    m = r.report["validation"]["metrics"]
    assert m["reference_heldout_perplexity"] == m["heldout_perplexity"] > 0  # the shipped pipeline/data/heldout.txt
    from pipeline.engine.report import format_summary

    said = format_summary(r.report, tmp_path / "a")
    assert f"perplexity: {m['heldout_perplexity']:.3f} on the held-out text" in said


def test_cache_off_writes_nothing(ck, tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_LOADER_METRICS_CACHE", "off")
    v = _run(ck, tmp_path / "a")
    v2 = _run(ck, tmp_path / "b")
    assert not any(_cached(v2).values())
    assert v["metrics"]["reference_perplexity"] == v2["metrics"]["reference_perplexity"]
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert set(report["validation"]["metric_costs"]) == {"forward", "perplexity", "reference", "greedy"}


# Issue 28: no number the run did not earn. A cached figure is used only when the loaded weights'
# fingerprint equals the one it was measured on, every entry is checked when read, and a cache that
# cannot be written never fails a load.

_OVERRIDE = "checkpoint.model={_target_: transformers.LlamaForCausalLM, rms_norm_eps: 10.0, rope_theta: 3.0}"


def _figures(v) -> dict:
    return {k: x for k, x in v["metrics"].items() if k != "forward_tokens_per_s"}


def _truth(ck, run_dir, monkeypatch, *extra) -> dict:
    """The figures measured with the cache off: what a run must report."""
    with monkeypatch.context() as m:
        m.setenv("MODEL_LOADER_METRICS_CACHE", "off")
        return _figures(_run(ck, run_dir, *extra))


def _identity(path) -> tuple:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _rewrite_in_place(path, edit) -> None:
    """Rewrite a file's bytes in place (same size, same inode) and restore its times, as `touch -r` would."""
    before = os.stat(path)
    with open(path, "r+b") as fh:
        edit(fh)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _zero_largest_tensor(fh) -> None:
    (n,) = struct.unpack("<Q", fh.read(8))
    header = json.loads(fh.read(n))
    begin, end = max((v["data_offsets"] for k, v in header.items() if k != "__metadata__"), key=lambda o: o[1] - o[0])
    fh.seek(8 + n + begin)
    fh.write(bytes(end - begin))


def _entry(cache, kind: str):
    (path,) = (cache / kind).glob("*.json" if kind == "model" else "*.pt")
    return path


def test_shard_rewritten_with_mtime_restored_is_measured_again(ck, cache, tmp_path, monkeypatch):
    first = _run(ck, tmp_path / "a")
    shard = sorted(ck.glob("model-*.safetensors"))[-1]
    before = _identity(shard)
    _rewrite_in_place(shard, _zero_largest_tensor)
    assert _identity(shard) == before  # path, size, mtime and inode cannot tell
    second = _run(ck, tmp_path / "b")
    truth = _truth(ck, tmp_path / "c", monkeypatch)
    assert _cached(second) == {"forward": False, "perplexity": False, "reference": False, "greedy": False}
    assert _figures(second) == truth
    assert truth["perplexity"] != first["metrics"]["perplexity"]
    assert {"entry": "model", "why": "measured on other weights"} in second["metric_cache"]["ignored"]
    fingerprint = second["metric_cache"]["fingerprint"]
    assert fingerprint["digest"] != first["metric_cache"]["fingerprint"]["digest"] and fingerprint["seconds"] >= 0
    assert second["metric_cache"]["content"]["bytes"] == sum(p.stat().st_size for p in ck.glob("*.safetensors"))
    stored = json.loads(_entry(cache, "model").read_text())  # replaced by what this load measured
    assert stored["perplexity"] == truth["perplexity"] and stored["fingerprint"] == fingerprint["digest"]


def test_model_override_is_another_key(ck, cache, tmp_path, monkeypatch):
    first = _run(ck, tmp_path / "a")
    other = _run(ck, tmp_path / "b", _OVERRIDE)
    assert not any(_cached(other).values())
    truth = _truth(ck, tmp_path / "c", monkeypatch, _OVERRIDE)
    assert _figures(other) == truth and truth["perplexity"] != first["metrics"]["perplexity"]


def test_config_rewritten_with_mtime_restored_is_another_key(ck, cache, tmp_path, monkeypatch):
    first = _run(ck, tmp_path / "a")
    config = ck / "config.json"
    text = config.read_text()
    assert '"rms_norm_eps": 1e-06' in text

    def edit(fh):
        fh.write(text.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e+01').encode())

    _rewrite_in_place(config, edit)
    second = _run(ck, tmp_path / "b")
    assert not any(_cached(second).values())
    truth = _truth(ck, tmp_path / "c", monkeypatch)
    assert _figures(second) == truth and truth["perplexity"] != first["metrics"]["perplexity"]


def _bad_model_entries(good: dict) -> dict[str, bytes]:
    return {
        "a list": b"[]",
        "perplexity a string (as reported)": b'{"perplexity": "x"}',
        "perplexity a string": json.dumps({**good, "perplexity": "x"}).encode(),
        "perplexity NaN": json.dumps({**good, "perplexity": float("nan")}).encode(),
        "continuation a number": json.dumps({**good, "continuation": 5}).encode(),
        "not JSON": b"{\x00\xff",
    }


def test_malformed_model_entries_are_measured_again_and_replaced(ck, cache, tmp_path):
    first = _run(ck, tmp_path / "first")
    path = _entry(cache, "model")
    good = json.loads(path.read_text())
    for i, (what, data) in enumerate(_bad_model_entries(good).items()):
        path.write_bytes(data)
        v = _run(ck, tmp_path / str(i))
        assert _figures(v) == _figures(first), what
        assert not _cached(v)["perplexity"] and not _cached(v)["greedy"] and _cached(v)["reference"], what
        assert v["metric_cache"]["ignored"] and v["metric_cache"]["ignored"][0]["entry"] == "model", what
        assert json.loads(path.read_text()) == good, what  # replaced by the figures measured again


def _bad_reference_entries(good: dict) -> dict[str, dict | list | bytes]:
    logits = good["logits"]
    return {
        "a list": [],
        "logits of shape (2, 3)": {**good, "logits": torch.zeros(2, 3)},
        "logits of shape (1,)": {**good, "logits": torch.ones(1)},
        "NaN logits": {**good, "logits": torch.full_like(logits, float("nan"))},
        "integer logits": {**good, "logits": logits.to(torch.int64)},
        "perplexity a string": {**good, "perplexity": "x"},
        "not a torch file": b"garbage",
    }


def test_malformed_reference_entries_are_measured_again_and_replaced(ck, cache, tmp_path):
    first = _run(ck, tmp_path / "first")
    path = _entry(cache, "reference")
    good = torch.load(path, weights_only=True)
    for i, (what, bad) in enumerate(_bad_reference_entries(good).items()):
        if isinstance(bad, bytes):
            path.write_bytes(bad)
        else:
            torch.save(bad, path)
        v = _run(ck, tmp_path / str(i))
        assert _figures(v) == _figures(first), what
        assert not _cached(v)["reference"] and _cached(v)["perplexity"], what
        assert v["metric_cache"]["ignored"][0]["entry"] == "reference", what
        again = torch.load(path, weights_only=True)  # replaced by the reference measured again
        assert torch.equal(again["logits"], good["logits"]) and again["perplexity"] == good["perplexity"], what


def _summary(result) -> dict[str, str]:
    return {line.split(":")[0]: line for line in result.stdout.splitlines() if line.split(":")[0] in _LINES}


_LINES = ("perplexity", "logits vs unquantized reference", "greedy")


def test_cli_summary_marks_cached_figures_and_survives_bad_entries(ck, cache, tmp_path):
    args = [f"checkpoint.path={ck}", "quantization=int8", "stages.validate.max_eval_tokens=64"]
    first = run_cli(*args, f"hydra.run.dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-2000:]
    assert set(_summary(first)) == set(_LINES) and "(cached)" not in first.stdout
    second = run_cli(*args, f"hydra.run.dir={tmp_path / 'b'}")
    assert second.returncode == 0, second.stderr[-2000:]
    lines = _summary(second)
    ppl = first.stdout.split("perplexity: ")[1].split()[0]
    assert lines["perplexity"].startswith(f"perplexity: {ppl} (cached) on the evaluation text (unquantized reference ")
    assert "(cached), " in lines["perplexity"] and lines["greedy"].endswith(" (cached)")
    assert lines["logits vs unquantized reference"].endswith(" (reference logits cached)")
    _entry(cache, "model").write_text('{"perplexity": "x"}')
    torch.save([], _entry(cache, "reference"))
    third = run_cli(*args, f"hydra.run.dir={tmp_path / 'c'}")
    assert third.returncode == 0, third.stderr[-2000:]
    assert _summary(third) == _summary(first)  # the true figures, measured again, not marked
    assert "metric cache: model entry" in third.stderr and "metric cache: reference entry" in third.stderr


def _fill(fs, leave: int) -> None:
    """Fill the filesystem, then give back `leave` bytes: room for a small file, not for a reference."""
    fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT)
    written = 0
    try:
        while True:
            written += os.write(fd, bytes(4096))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    os.ftruncate(fd, max(0, written - leave))
    os.close(fd)


def _leftovers(root) -> list:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


def test_full_disk_never_fails_a_load(ck, tmpfs, tmp_path, monkeypatch):
    fs = tmpfs()
    _fill(fs, 4096)
    monkeypatch.setenv("MODEL_LOADER_METRICS_CACHE", str(fs / "metrics"))
    r = load(
        [f"checkpoint.path={ck}", "quantization=int8", "stages.validate.max_eval_tokens=64"], run_dir=tmp_path / "a"
    )
    v = r.report["validation"]
    assert r.report["status"] == "ok" and not any(_cached(v).values())
    assert any("could not write" in w for w in v["metric_cache"]["warnings"]), v["metric_cache"]
    assert _figures(v) == _truth(ck, tmp_path / "b", monkeypatch)
    assert _leftovers(fs) == []


def test_read_only_cache_never_fails_a_load(ck, tmpfs, tmp_path, monkeypatch):
    fs = tmpfs("size=64k,ro")
    monkeypatch.setenv("MODEL_LOADER_METRICS_CACHE", str(fs / "metrics"))
    done = run_cli(f"checkpoint.path={ck}", "quantization=int8", "stages.validate.max_eval_tokens=64",
                   f"hydra.run.dir={tmp_path / 'a'}")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "metric cache: could not write" in done.stderr and "(cached)" not in done.stdout
    assert list(fs.rglob("*")) == []


def test_keyed_sum_sees_every_change_and_depends_on_the_key():
    """The GPU fingerprint (_keyed_sum, run here on the CPU): a flipped bit, a swap, a zeroed word, another key."""
    from pipeline.measure.fingerprint import _keyed_sum

    words = torch.randint(-(2**62), 2**62, (3 * (1 << 12) + 5,), dtype=torch.int64)
    base = int(_keyed_sum(words, 7))
    flipped, swapped, zeroed = words.clone(), words.clone(), words.clone()
    flipped[100] ^= 1 << 63
    swapped[[3, 4000]] = words[[4000, 3]]
    zeroed[-1] = 0
    others = [int(_keyed_sum(w, 7)) for w in (flipped, swapped, zeroed)] + [int(_keyed_sum(words, 8))]
    assert base == int(_keyed_sum(words.clone(), 7)) and base not in others and len(set(others)) == 4


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_fingerprint_sees_quantized_codes_scales_and_buffers(ck, tmp_path, method):
    """Every tensor the model computes with counts: int8 codes and SCB scales, 4-bit absmax, buffers, norms."""
    from pipeline.measure.fingerprint import weights_fingerprint

    model = load([f"checkpoint.path={ck}", f"quantization={method}", "stages=[instantiate_empty,plan,quantize,load_shards]"],
                 run_dir=tmp_path / "run").model  # fmt: skip
    layer = model.model.layers[0].mlp.down_proj
    stats = layer.weight.SCB if method == "int8" else layer.weight.quant_state.absmax
    first = weights_fingerprint(model, None, 1)[0]
    seen = {first}
    for tensor in (layer.weight.data, stats, model.model.rotary_emb.inv_freq, model.model.norm.weight.data):
        before = tensor.clone()
        tensor.view(torch.uint8)[0] ^= 1  # one bit
        seen.add(weights_fingerprint(model, None, 1)[0])
        tensor.copy_(before)
    assert len(seen) == 5 and weights_fingerprint(model, None, 1)[0] == first
