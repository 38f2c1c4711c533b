"""int8 options: skip patterns, per-module thresholds and skips, warnings for patterns matching nothing."""
import pytest

from pipeline import load
from pipeline.bnb import import_bitsandbytes
from pipeline.errors import UserError


def _int8_layers(model):
    bnb = import_bitsandbytes()
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}


def test_skip_modules_pattern(tiny, tmp_path):
    r = load([f"checkpoint.path={tiny('llama')}", "quantization.skip_modules=[down_proj]"], run_dir=tmp_path / "r")
    layers = _int8_layers(r.model)
    assert layers and not any(n.endswith("down_proj") for n in layers)
    reasons = r.report["quantization"]["skipped_reasons"]
    assert reasons["model.layers.0.mlp.down_proj"] == "skip_modules pattern 'down_proj'"
    assert r.report["quantization"]["warnings"] == []
    assert r.report["validation"]["plan_error"] == {"cpu": 0.0}  # skipped layers planned at their dtype


def test_per_module_threshold_and_skip(tiny, tmp_path):
    r = load([f"checkpoint.path={tiny('llama')}", "quantization.threshold=5.0",
              "quantization.overrides={q_proj: 0.0, o_proj: skip}"], run_dir=tmp_path / "r")
    layers = _int8_layers(r.model)
    assert {m.state.threshold for n, m in layers.items() if n.endswith("q_proj")} == {0.0}
    assert {m.state.threshold for n, m in layers.items() if not n.endswith("q_proj")} == {5.0}
    assert not any(n.endswith("o_proj") for n in layers)
    q = r.report["quantization"]
    assert q["thresholds"] == {f"model.layers.{i}.self_attn.q_proj": 0.0 for i in range(3)}
    assert q["skipped_reasons"]["model.layers.2.self_attn.o_proj"] == "overrides pattern 'o_proj': skip"


def test_pattern_matching_nothing_is_a_warning_in_the_report(tiny, tmp_path):
    r = load([f"checkpoint.path={tiny('llama')}", "quantization.skip_modules=[attention_xyz]",
              "quantization.overrides={nothing_here: 1.0}"], run_dir=tmp_path / "r")
    assert r.report["status"] == "ok"
    assert r.report["quantization"]["warnings"] == [
        "quantization.skip_modules pattern 'attention_xyz' matches no Linear layer",
        "quantization.overrides pattern 'nothing_here' matches no Linear layer",
    ]


@pytest.mark.parametrize("override,match", [
    ("quantization.overrides={q_proj: -2}", "quantization.overrides.q_proj"),
    ("quantization.overrides={q_proj: lots}", "quantization.overrides.q_proj"),
    ("quantization.method=int4", "quantization.method: unknown method 'int4'"),
])
def test_bad_quantization_values(override, match, tiny, tmp_path):
    with pytest.raises(UserError, match=match):
        load([f"checkpoint.path={tiny('llama')}", override], run_dir=tmp_path / "r")
