"""LLM.int8 on the CPU gives the same int8 results on every CPU path torch can take.

Each case runs in fresh processes under ATEN_CPU_CAPABILITY=avx2, =default and the machine's
own capability (torch reads the variable once, at start; bitsandbytes picks its int8 kernel from
it at import). Inputs are made here and handed over as files: torch's own random generators
differ between capabilities, so no child makes its own data. Nothing here depends on which
instruction set the machine has: on an AVX2-only machine "native" is simply avx2 again.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pipeline import load
from pipeline.errors import UserError
from pipeline.quant.cpu_int8 import EXACT_SLICE

PATHS = ("native", "avx2", "default", "blas_avx2")
# MKL's and oneDNN's own code paths capped at AVX2: on an AVX-512 machine torch still reports AVX512,
# so bitsandbytes would call torch._int_mm, whose oneDNN GEMM then lacks VNNI (as on an AVX-512 CPU
# without VNNI) and saturates; quant/cpu_int8.py finds that at first use and multiplies exactly.
BLAS_AVX2 = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}

CHILD = r"""
import sys, torch
from pipeline.quant.bnb import empty_module, import_bitsandbytes, quantize_int8
from pipeline.quant.spec import QuantSpec
mode, src, dst = sys.argv[1:4]
d = torch.load(src)
bnb = import_bitsandbytes()
old = torch.nn.Linear(d["w"].shape[1], d["w"].shape[0], bias=True)
layer = empty_module(old, QuantSpec(method="int8", threshold=6.0, cpu_matmul=mode))
layer._parameters["weight"] = quantize_int8(d["w"])
layer._parameters["bias"] = torch.nn.Parameter(d["b"], requires_grad=False)
layer.eval()
with torch.inference_mode():
    y = layer(d["x"])
a, b = d["ca"], d["cb"]
out = dict(y=y, CB=layer.state.CB if layer.state.CB is not None else layer.weight.CB,
           SCB=layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB,
           mm=torch.ops.bitsandbytes.int8_linear_matmul.default(a, b),
           capability=torch.backends.cpu.get_cpu_capability())
torch.save(out, dst)
"""


def _operands(tmp_path):
    """A layer input with outlier columns (> 6.0) and heavy tails, plus rows whose int8 dot products pass 2**24."""
    g = torch.Generator().manual_seed(0)
    k = 2 * EXACT_SLICE + 512
    x = torch.randn(48, k, generator=g) * torch.rand(1, k, generator=g) * 2
    x[:, [3, 700, 1900]] *= 9.0  # outlier columns, as LLM.int8 sees them in real models
    x[:4] = 0.5  # constant rows: every code 127
    w = torch.randn(80, k, generator=g) * 0.02
    w[:3] = 0.01  # constant weight rows: codes 127 too, so those dot products reach k * 127 * 127 > 2**24
    ca = torch.full((4, k), 127, dtype=torch.int8)
    ca[1] = torch.randint(90, 128, (k,), generator=g, dtype=torch.int8)
    cb = torch.full((6, k), 127, dtype=torch.int8)
    cb[2] = -torch.randint(90, 128, (k,), generator=g, dtype=torch.int8)
    src = tmp_path / "operands.pt"
    torch.save({"x": x, "w": w, "b": torch.randn(80, generator=g), "ca": ca, "cb": cb}, src)
    return src, ca, cb


def _run(path: str, mode: str, src, dst):
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", *BLAS_AVX2)}
    env["HF_HUB_OFFLINE"] = "1"
    if path == "blas_avx2":
        env.update(BLAS_AVX2)
    elif path != "native":
        env["ATEN_CPU_CAPABILITY"] = path
    p = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(src), str(dst)], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return torch.load(dst)


@pytest.fixture(scope="module")
def exact_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu_paths")
    src, ca, cb = _operands(tmp)
    return {p: _run(p, "exact", src, tmp / f"{p}.pt") for p in PATHS}, ca, cb


@pytest.mark.quality
def test_each_path_is_the_capability_it_claims(exact_runs):
    """default exists everywhere; avx2 wherever the CPU has it (x86 with AVX2 or AVX-512)."""
    runs, _, _ = exact_runs
    assert runs["default"]["capability"] == "DEFAULT"
    if runs["native"]["capability"] in ("AVX2", "AVX512"):
        assert runs["avx2"]["capability"] == "AVX2"


@pytest.mark.quality
def test_int8_matmul_is_exact_on_every_path(exact_runs):
    """int8 x int8 -> int32 equals the integer product, also where sums pass 2**24 (bitsandbytes' fp32
    fallback rounds those)."""
    runs, ca, cb = exact_runs
    exact = (ca.long() @ cb.long().t()).to(torch.int32)
    assert exact.abs().max() > 2**24
    for path, r in runs.items():
        assert torch.equal(r["mm"], exact), path


@pytest.mark.quality
@pytest.mark.parametrize("path", ["avx2", "default", "blas_avx2"])
def test_int8_layer_output_and_weights_equal_across_paths(exact_runs, path):
    """One real Linear8bitLt (threshold 6.0, outlier columns, sums past 2**24): the same CB/SCB and the
    same output bits under every capability."""
    runs, _, _ = exact_runs
    ref, other = runs["native"], runs[path]
    assert torch.equal(ref["CB"], other["CB"]) and torch.equal(ref["SCB"], other["SCB"])
    assert torch.equal(ref["y"], other["y"]), (ref["y"] - other["y"]).abs().max()


@pytest.mark.quality
def test_bitsandbytes_mode_is_bitsandbytes_own_kernel(tmp_path):
    """quantization.cpu_matmul=bitsandbytes gives exactly what bitsandbytes computes on its own
    (a process where we registered nothing)."""
    src, ca, cb = _operands(tmp_path)
    ours = _run("avx2", "bitsandbytes", src, tmp_path / "ours.pt")["mm"]
    code = (
        "import sys, torch, bitsandbytes; d = torch.load(sys.argv[1]); "
        "torch.save(torch.ops.bitsandbytes.int8_linear_matmul.default(d['ca'], d['cb']), sys.argv[2])"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    p = subprocess.run(
        [sys.executable, "-c", code, str(src), str(tmp_path / "own.pt")], env=env, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert torch.equal(ours, torch.load(tmp_path / "own.pt"))


def test_bad_cpu_matmul_is_a_user_error_before_loading(tiny, tmp_path):
    with pytest.raises(UserError, match=r"quantization\.cpu_matmul: 'fast'; choose one of exact, bitsandbytes"):
        load(
            [f"checkpoint.path={tiny('llama')}", "quantization=int8", "quantization.cpu_matmul=fast"], run_dir=tmp_path
        )


def test_report_says_which_cpu_matmul(tiny, tmp_path):
    r = load([f"checkpoint.path={tiny('llama')}", "quantization=int8"], run_dir=tmp_path / "a")
    assert r.report["quantization"]["cpu_matmul"] == "exact"
    r = load(
        [
            f"checkpoint.path={tiny('llama')}",
            "quantization=int8",
            "quantization.cpu_matmul=bitsandbytes",
            "quantization.cpu_numerics=native",
        ],
        run_dir=tmp_path / "b",
    )
    assert r.report["quantization"]["cpu_matmul"] == "bitsandbytes"
