"""Portable CPU numerics (quant/cpu_numerics.py): an int8 model measured under them gives the same logits on
every CPU, and the model handed back runs torch's and bitsandbytes' own kernels (issue 30).

The cross-path tests run real int8 models of every family in tests/architectures.py in fresh
processes under each CPU code path torch and its libraries can be made to take on one machine:
the machine's own, ATEN_CPU_CAPABILITY=avx2 and =default (torch's vector width), MKL and oneDNN
capped at AVX2 (their own code paths, and oneDNN's int8 GEMM without VNNI), and one thread.
Inputs are made here and handed over as files (torch's random generators differ by capability).
On an AVX2-only machine "native" is avx2 again; the other paths still differ from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from architectures import ARCHITECTURES, inputs_for

from pipeline import load
from pipeline.errors import UserError
from pipeline.quant import cpu_numerics as cn

aten = torch.ops.aten
NO_METRICS = [f"stages.validate.metrics.{m}=false" for m in ("perplexity", "reference", "greedy", "throughput")]
PATHS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "default": {"ATEN_CPU_CAPABILITY": "default"},
    "blas_avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "one_thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
}

CHILD = r"""
import contextlib, sys, torch
from pipeline import load
from pipeline.quant.cpu_numerics import portable_numerics
numerics, src, dst = sys.argv[1:4]
cases = torch.load(src)
out = {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
for family, (path, inputs) in cases.items():
    r = load([f"checkpoint.path={path}", "quantization=int8", f"quantization.cpu_numerics={numerics}",
              "stages=[instantiate_empty,plan,quantize,load_shards]"], run_dir=f"{dst}.runs/{family}")
    head, seen = r.model.get_output_embeddings(), {}
    if head is not None:  # what reaches the output head, which runs torch's own kernel
        head.register_forward_pre_hook(lambda m, a: seen.update(head_input=a[0]))
    with torch.inference_mode(), portable_numerics(r.model) if numerics == "portable" else contextlib.nullcontext():
        o = r.model(**inputs)
    if r.report["quantization"]["quantized"]:  # Falcon has none (FalconLinear is not quantized)
        out[family] = dict(seen, out=o["logits"] if "logits" in o else o["last_hidden_state"])
torch.save(out, dst)
"""


def _run_all(numerics: str, path: str, src, dst) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", *PATHS["blas_avx2"])}
    env.update(PATHS[path], HF_HUB_OFFLINE="1")
    p = subprocess.run(
        [sys.executable, "-c", CHILD, numerics, str(src), str(dst)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return torch.load(dst)


@pytest.fixture(scope="module")
def cases(saved, tmp_path_factory):
    """Every family's tiny checkpoint and its inputs, text ones of 40 tokens (more than any vector is wide)."""
    tmp = tmp_path_factory.mktemp("numerics")
    out = {}
    g = torch.Generator().manual_seed(1)
    for arch in ARCHITECTURES:
        path = saved(arch.family)
        import transformers

        config = transformers.AutoConfig.from_pretrained(path)
        model = getattr(transformers, arch.model)(config)
        inputs = inputs_for(model)
        if "input_ids" in inputs:  # decoder ids keep inputs_for's length (Whisper's tiny decoder has 32 positions)
            inputs["input_ids"] = torch.randint(3, config.vocab_size, (1, 40), generator=g)
        out[arch.family] = (str(path), inputs)
    src = tmp / "cases.pt"
    torch.save(out, src)
    return src, tmp


@pytest.fixture(scope="module")
def portable_runs(cases):
    src, tmp = cases
    return {p: _run_all("portable", p, src, tmp / f"portable_{p}.pt") for p in PATHS}


@pytest.mark.parametrize("path", [p for p in PATHS if p != "native"])
def test_int8_logits_bit_identical_on_every_cpu_path(portable_runs, path):
    ref, other = portable_runs["native"], portable_runs[path]
    families = [f for f in ref if f not in ("capability", "threads")]
    assert len(families) == len(ARCHITECTURES) - 1 and sorted(families) == sorted(f for f in other if f in families)
    with_head = [f for f in families if "head_input" in ref[f]]
    assert len(with_head) >= len(families) - 2  # all but image classification heads
    for f in families:
        if f in with_head:  # everything before the head bit for bit; the head's own GEMM to its last bits
            assert torch.equal(ref[f]["head_input"], other[f]["head_input"]), f"{path}: {f} head input differs"
            assert torch.allclose(ref[f]["out"], other[f]["out"], rtol=1e-5, atol=1e-6), f"{path}: {f}"
        else:
            assert torch.equal(ref[f]["out"], other[f]["out"]), f"{path}: {f} outputs differ"


def test_the_paths_are_the_ones_claimed(portable_runs):
    assert portable_runs["default"]["capability"] == "DEFAULT"
    assert portable_runs["one_thread"]["threads"] == 1
    if portable_runs["native"]["capability"] in ("AVX2", "AVX512"):
        assert portable_runs["avx2"]["capability"] == "AVX2"


def test_native_numerics_do_differ_between_paths(cases, portable_runs):
    """The control: torch's own kernels give other int8 outputs on another path (so the test above can fail)."""
    src, tmp = cases
    native = _run_all("native", "native", src, tmp / "native_native.pt")
    plain = _run_all("native", "default", src, tmp / "native_default.pt")
    families = [f for f in native if f not in ("capability", "threads")]
    assert any(not torch.equal(native[f]["out"], plain[f]["out"]) for f in families)


def test_portable_ops_are_fp64_rounded_once():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 33, generator=g)
    got = cn.portable_call(aten.softmax.int, (x, -1), {"dtype": torch.float32})
    assert got.dtype == torch.float32 and torch.equal(got, torch.softmax(x.double(), -1).float())
    half = x.half()
    got = cn.portable_call(aten.log_softmax.int, (half, -1), {"dtype": torch.float32})  # a dtype argument
    assert got.dtype == torch.float32 and torch.equal(got, torch.log_softmax(half.double(), -1).float())
    got = cn.portable_call(aten.silu.default, (x.bfloat16(),), {})
    assert got.dtype == torch.bfloat16 and torch.equal(got, torch.nn.functional.silu(x.bfloat16().double()).bfloat16())
    ints = torch.arange(10)
    assert torch.equal(cn.portable_call(aten.sum.default, (ints,), {}), ints.sum())  # not a float: as torch does it


@pytest.mark.parametrize("block_bytes", [cn.BLOCK_BYTES, 8 * 5 * 7])
def test_gemms_in_fp64_by_blocks(monkeypatch, block_bytes):
    """linear/addmm/mm/matmul equal the fp64 product rounded once, whether the weight is split or not."""
    monkeypatch.setattr(cn, "BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 6, 35, generator=g), torch.randn(19, 35, generator=g), torch.randn(19, generator=g)
    want = (x.double() @ w.double().t() + b.double()).float()
    assert torch.equal(cn.portable_call(aten.linear.default, (x, w, b), {}), want)
    x2 = x.reshape(-1, 35)
    assert torch.equal(cn.portable_call(aten.addmm.default, (b, x2, w.t()), {}), want.reshape(-1, 19))
    assert torch.equal(cn.portable_call(aten.mm.default, (x2, w.t()), {}), (x2.double() @ w.double().t()).float())
    assert torch.equal(cn.portable_call(aten.matmul.default, (x, w.t()), {}), (x.double() @ w.double().t()).float())


def test_grouped_mm_in_fp64():
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(10, 16, generator=g), torch.randn(3, 16, 12, generator=g)  # torch's kernel: 16-byte strides
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)  # an empty group too
    got = cn.portable_call(aten._grouped_mm.default, (a, w), {"offs": offs})
    want = torch.cat([a[:3].double() @ w[0].double(), a[3:].double() @ w[2].double()]).float()
    assert torch.equal(got, want)
    assert torch.allclose(got, torch._grouped_mm(a, w, offs=offs), rtol=1e-5, atol=1e-5)


def test_outlier_columns_in_fp64_as_bitsandbytes_computes_them():
    from pipeline.quant.bnb import import_bitsandbytes

    import_bitsandbytes()
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 64, generator=g), torch.randn(16, 64, generator=g) * 0.05
    x[:, [5, 40]] *= 20  # outlier columns above 6.0
    cb, scb, _ = torch.ops.bitsandbytes.int8_vectorwise_quant.default(w.half())
    ca, sca, cols = torch.ops.bitsandbytes.int8_vectorwise_quant.default(x.half(), 6.0)
    assert cols.tolist() == [5, 40]
    theirs, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm.default(x, ca, cb, sca, scb, cols, None)
    ours, sub = cn.mixed_scaled_mm(x, ca, cb, sca, scb, cols, None)
    assert torch.equal(sub, x[:, cols])
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5) and not torch.equal(ours, torch.zeros_like(ours))


def _untouched(model) -> None:
    """The model runs its class's forward, no dispatch mode is active and no hook of ours is left."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode, _get_current_dispatch_mode_stack

    assert "forward" not in model.__dict__ and not hasattr(model, "portable_cpu_numerics")
    assert _get_current_dispatch_mode() is None and _get_current_dispatch_mode_stack() == []
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_returned_int8_model_runs_its_own_kernels(tiny, tmp_path):
    """validate measured under portable numerics, yet the model handed back computes what the same model
    loaded with cpu_numerics=native computes, bit for bit (the same kernels), generate included."""
    args = [f"checkpoint.path={tiny('llama')}", "quantization=int8", "quantization.threshold=0.5"]
    r = load([*args, "stages.validate.metrics.throughput=false"], run_dir=tmp_path / "a")
    assert r.report["quantization"]["cpu_numerics"] == "portable"
    assert "logits_rel_error" in r.report["validation"]["metrics"]  # validate measured under the mode
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    assert plan["inputs"]["quantization"]["cpu_numerics"] == "portable"  # so also the metric cache's key
    _untouched(r.model)
    native = load([*args, "quantization.cpu_numerics=native", *NO_METRICS], run_dir=tmp_path / "b")
    assert native.report["quantization"]["cpu_numerics"] == "native"
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, theirs = r.model(input_ids=ids).logits, native.model(input_ids=ids).logits
        with cn.portable_numerics(r.model):
            portable = r.model(input_ids=ids).logits
    assert torch.equal(ours, theirs) and not torch.equal(ours, portable)
    _untouched(r.model)
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(r.model.generate(input_ids=ids, **settings), native.model.generate(input_ids=ids, **settings))


def _deterministic_llama(dest):
    """The tiny Llama with weights from numpy's RandomState (the same bits on every CPU, unlike torch's
    generators) and a byte-level tokenizer of its 256 ids: every metric runs, and is portable."""
    import numpy as np
    from helpers import _configs
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    cls, config = _configs()["llama"]
    model, rng = cls(config).eval(), np.random.RandomState(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape)) * 0.2))
    model.save_pretrained(dest)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0]).save_pretrained(dest)
    return dest


# Measured before issue 30 (portable numerics on the model's forward, 2026-12-06), on this checkpoint and settings.
BEFORE = {"perplexity": 288.421, "reference_perplexity": 288.0782, "logits_rel_error": 0.014775,
          "continuation": "\ufffd?\ufffd?\ufffd?\ufffd?\ufffd<<<"}  # fmt: skip


def test_report_metrics_unchanged_with_numerics_in_the_measurement(tmp_path):
    """Every metric validate reports (perplexity, the reference's, logits error, greedy text) is what it was when
    the model itself ran portable; native measurement gives another figure (so this can fail)."""
    ck = _deterministic_llama(tmp_path / "ck")
    args = [f"checkpoint.path={ck}", "quantization=int8", "quantization.unquantized_dtype=fp32",
            "quantization.threshold=0.5", "stages.validate.max_eval_tokens=64"]  # fmt: skip
    r = load(args, run_dir=tmp_path / "a")
    assert {k: r.report["validation"]["metrics"][k] for k in BEFORE} == BEFORE
    _untouched(r.model)
    native = load([*args, "quantization.cpu_numerics=native"], run_dir=tmp_path / "b")
    assert native.report["validation"]["metrics"]["perplexity"] != BEFORE["perplexity"]


def test_bad_cpu_numerics_is_a_user_error_before_loading(tiny, tmp_path):
    with pytest.raises(UserError, match=r"quantization\.cpu_numerics: 'exact'; choose one of portable, native"):
        load(
            [f"checkpoint.path={tiny('llama')}", "quantization=int8", "quantization.cpu_numerics=exact"],
            run_dir=tmp_path,
        )


def test_portable_numerics_need_exact_products(tiny, tmp_path):
    with pytest.raises(
        UserError, match=r"quantization\.cpu_numerics=portable needs exact int8 products.*cpu_numerics=native"
    ):
        load(
            [f"checkpoint.path={tiny('llama')}", "quantization=int8", "quantization.cpu_matmul=bitsandbytes"],
            run_dir=tmp_path,
        )


def test_no_int8_layer_on_the_cpu_keeps_torchs_kernels(tiny, tmp_path):
    """The mode is entered only where an int8 layer runs on the CPU (here: every Linear skipped)."""
    r = load(
        [f"checkpoint.path={tiny('llama')}", "quantization=int8", "quantization.skip_modules=[*]", *NO_METRICS],
        run_dir=tmp_path,
    )
    assert r.report["quantization"]["quantized"] == 0 and r.report["quantization"]["cpu_numerics"] is None
    _untouched(r.model)
