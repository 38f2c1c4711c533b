"""Mixed precision (issue 32): per-module methods in one plan, measured sensitivities, quantization=auto."""

import pytest
import torch

from pipeline import load
from pipeline.errors import UserError
from pipeline.quant.bnb import import_bitsandbytes


def _classes(model) -> dict[str, str]:
    bnb = import_bitsandbytes()
    kinds = {bnb.nn.Linear8bitLt: "int8", bnb.nn.Linear4bit: "4bit"}
    return {n: kinds[type(m)] for n, m in model.named_modules() if type(m) in kinds}


def test_mixed_methods_load_exactly(tiny, tmp_path):
    """int8, nf4 and kept modules side by side: each module is its method's class, the plan is exact."""
    r = load(
        [
            f"checkpoint.path={tiny('llama')}",
            "quantization=int8",
            "quantization.methods={mlp: nf4, o_proj: keep}",
            "quantization.compute_dtype=fp32",
        ],
        run_dir=tmp_path / "r",
    )
    assert r.report["status"] == "ok"
    classes = _classes(r.model)
    assert {n for n, k in classes.items() if k == "4bit"} == {
        f"model.layers.{i}.mlp.{p}" for i in range(3) for p in ("gate_proj", "up_proj", "down_proj")
    }
    assert {n for n, k in classes.items() if k == "int8"} == {
        f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "k_proj", "v_proj")
    }
    assert not any(n.endswith("o_proj") for n in classes)
    for name, module in r.model.named_modules():
        if name in classes and classes[name] == "4bit":
            assert module.weight.quant_type == "nf4" and module.compute_dtype == torch.float32
    q = r.report["quantization"]
    assert q["methods"]["model.layers.0.mlp.up_proj"] == "nf4"
    assert q["methods"]["model.layers.0.self_attn.q_proj"] == "int8"
    assert q["skipped_reasons"]["model.layers.1.self_attn.o_proj"] == "methods pattern 'o_proj': keep"
    v = r.report["validation"]
    assert all(v["checks"].values()) and v["plan_error"] == {"cpu": 0.0}
    assert v["measured_bytes"] == r.report["plan"]["predicted_bytes"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["quantization.methods={mlp: int4}"],
            r"^quantization\.methods\.mlp: 'int4'; choose one of int8, nf4, fp4, keep$",
        ),
        (["quantization=none", "quantization.methods={mlp: nf4}"], r"^quantization\.methods: per-module methods need"),
    ],
)
def test_bad_methods_are_exit_2(overrides, match, tiny, tmp_path):
    with pytest.raises(UserError, match=match):
        load([f"checkpoint.path={tiny('llama')}", "+experiment=dry_run", *overrides], run_dir=tmp_path / "r")


@pytest.fixture
def ck(tiny, tmp_path):
    """The tiny Llama with a real byte-level tokenizer: the budget's perplexity can be measured."""
    import shutil

    from test_metric_cache import _tokenizer

    dest = tmp_path / "ck"
    shutil.copytree(tiny("llama"), dest)
    _tokenizer(dest)
    return dest


def test_auto_meets_its_budget_and_says_how(ck, tmp_path, monkeypatch):
    """quantization=auto: every module's method and sensitivity reported, each module its method's class, plan
    error 0, the confirmed perplexity within the budget; a second run takes the sensitivities from the cache."""
    monkeypatch.setenv("MODEL_LOADER_METRICS_CACHE", str(tmp_path / "cache"))
    args = [f"checkpoint.path={ck}", "quantization=auto", "quantization.budget=2%", "quantization.compute_dtype=fp32"]
    r = load(args, run_dir=tmp_path / "r")
    assert r.report["status"] == "ok"
    auto = r.report["auto"]
    assert set(auto["modules"]) == {f"model.layers.{i}.{p}" for i in range(3) for p in _LINEARS}
    assert auto["confirmed_perplexity"] <= auto["reference_perplexity"] * 1.02
    assert sum(auto["counts"].values()) == 21 and auto["sensitivities_cached"] is False
    classes = _classes(r.model)
    for name, entry in auto["modules"].items():
        assert set(entry["sensitivity"]) == {"int8", "nf4"}
        assert classes.get(name, "keep") == {"nf4": "4bit"}.get(entry["method"], entry["method"])
    v = r.report["validation"]
    assert v["plan_error"] == {"cpu": 0.0} and all(v["checks"].values())
    again = load(args, run_dir=tmp_path / "r2")
    assert again.report["auto"]["sensitivities_cached"] is True
    assert again.report["auto"]["modules"] == auto["modules"]


_LINEARS = [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
_LINEARS += [f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["quantization=auto", "quantization.budget=abc"], r"^quantization\.budget: 'abc' is not a perplexity"),
        (["quantization=auto", "quantization.budget=null"], r"^quantization\.budget: quantization=auto needs"),
        (["quantization=int8", "quantization.budget=1%"], r"^quantization\.budget: '1%' is for quantization=auto"),
    ],
)
def test_bad_budgets_are_exit_2(overrides, match, tiny, tmp_path):
    with pytest.raises(UserError, match=match):
        load([f"checkpoint.path={tiny('llama')}", "+experiment=dry_run", *overrides], run_dir=tmp_path / "r")


def test_auto_without_a_tokenizer_is_exit_2(tiny, tmp_path):
    with pytest.raises(UserError, match=r"^quantization=auto: the budget is a perplexity on the evaluation text"):
        load([f"checkpoint.path={tiny('llama')}", "quantization=auto"], run_dir=tmp_path / "r")
