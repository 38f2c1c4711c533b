"""int8 options: skip patterns, per-module thresholds and skips, warnings for patterns matching nothing."""

import json
import re

import pytest
import torch

from pipeline import load
from pipeline.errors import UserError
from pipeline.quant.bnb import import_bitsandbytes

DRY = "+experiment=dry_run"


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
    r = load(
        [
            f"checkpoint.path={tiny('llama')}",
            "quantization.threshold=5.0",
            "quantization.overrides={q_proj: 0.0, o_proj: skip}",
        ],
        run_dir=tmp_path / "r",
    )
    layers = _int8_layers(r.model)
    assert {m.state.threshold for n, m in layers.items() if n.endswith("q_proj")} == {0.0}
    assert {m.state.threshold for n, m in layers.items() if not n.endswith("q_proj")} == {5.0}
    assert not any(n.endswith("o_proj") for n in layers)
    q = r.report["quantization"]
    assert q["thresholds"] == {f"model.layers.{i}.self_attn.q_proj": 0.0 for i in range(3)}
    assert q["skipped_reasons"]["model.layers.2.self_attn.o_proj"] == "overrides pattern 'o_proj': skip"


def test_pattern_matching_nothing_is_a_warning_in_the_report(tiny, tmp_path):
    r = load(
        [
            f"checkpoint.path={tiny('llama')}",
            "quantization.skip_modules=[attention_xyz]",
            "quantization.overrides={nothing_here: 1.0}",
        ],
        run_dir=tmp_path / "r",
    )
    assert r.report["status"] == "ok"
    assert r.report["quantization"]["warnings"] == [
        "quantization.skip_modules pattern 'attention_xyz' matches no Linear layer",
        "quantization.overrides pattern 'nothing_here' matches no Linear layer",
    ]


NF4 = "quantization=nf4"


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["quantization.overrides={q_proj: -2}"], "quantization.overrides.q_proj"),
        (["quantization.overrides={q_proj: lots}"], "quantization.overrides.q_proj"),
        (["quantization.method=int4"], "quantization.method: unknown method 'int4'"),
        (["quantization.offloaded=sometimes"], "quantization.offloaded: 'sometimes' is not valid"),
        (["quantization.unquantized_dtype=int3"], "quantization.unquantized_dtype: unknown dtype 'int3'"),
        (["quantization.threshold=-1"], "quantization.threshold: -1 is negative"),
        ([NF4, "quantization.compute_dtype=fp8"], "quantization.compute_dtype: unknown dtype 'fp8'"),
        ([NF4, "quantization.blocksize=100"], "quantization.blocksize: 100; choose one of 64"),
        ([NF4, "quantization.double_quant=maybe"], "quantization.double_quant: 'maybe' is not true or false"),
        (
            [NF4, "quantization.overrides={q_proj: 2.0}"],
            "quantization.overrides.q_proj: 2.0; with quantization=nf4 an override can only be skip",
        ),
        ([NF4, "quantization.offloaded=int8"], "quantization.offloaded: 'int8' is not valid with quantization=nf4"),
    ],
)
def test_bad_quantization_values(overrides, match, tiny, tmp_path):
    with pytest.raises(UserError, match=match):
        load([f"checkpoint.path={tiny('llama')}", *overrides], run_dir=tmp_path / "r")


def test_unquantized_dtype_sets_what_int8_leaves_alone(tiny, tmp_path):
    """Issue 29: what int8 leaves alone follows `dtype` by default (as transformers); fp32 is an opt-in."""
    ck = tiny("llama", torch.bfloat16)
    fp32 = load([f"checkpoint.path={ck}", "quantization.unquantized_dtype=fp32"], run_dir=tmp_path / "fp32")
    follow = load([f"checkpoint.path={ck}"], run_dir=tmp_path / "policy")
    assert fp32.model.model.embed_tokens.weight.dtype == torch.float32
    assert fp32.model.model.norm.weight.dtype == torch.float32
    assert follow.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert follow.model.model.norm.weight.dtype == torch.bfloat16
    for r in (fp32, follow):
        assert all(r.report["validation"]["checks"].values()) and set(
            r.report["validation"]["plan_error"].values()
        ) == {0.0}
        assert r.report["quantization"]["quantized"] == 21
    emb = 256 * 64  # tied embedding and head, the only large tensor int8 leaves alone
    assert fp32.report["plan"]["predicted_bytes"]["cpu"] - follow.report["plan"]["predicted_bytes"]["cpu"] >= 2 * emb
    # the reference is the unquantized model in the same dtypes: fp32 for the opt-in
    assert fp32.report["validation"]["metrics"]["reference_dtype"] == "fp32"
    assert follow.report["validation"]["metrics"]["reference_dtype"] == "auto"
    ref_fp32 = fp32.report["validation"]["metrics"]["logits_rel_error"]
    assert 0 < ref_fp32 < 0.2


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_dtype_is_the_dtype_of_every_tensor_not_quantized(method, tiny, tmp_path):
    """Issue 29: `dtype=bf16` on an fp32 checkpoint gives every unquantized tensor bf16 (keep-in-fp32 aside),
    as transformers' `dtype=torch.bfloat16` does under bitsandbytes."""
    r = load([f"checkpoint.path={tiny('llama')}", f"quantization={method}", "dtype=bf16", DRY], run_dir=tmp_path / "r")
    plan = json.loads((tmp_path / "r" / "plan.json").read_text())["tensors"]
    rest = {n: t["dtype"] for n, t in plan.items() if "quantized" not in t and n.endswith("weight")}
    assert rest and set(rest.values()) == {"bfloat16"}, rest
    assert r.report["plan"]["predicted_bytes"]["cpu"] == sum(t["bytes"] for t in plan.values())


def test_cap_error_names_the_keys_that_would_make_it_fit(tiny, tmp_path):
    """The caps error says how big the model is as configured and with each key that shrinks it."""
    ck = tiny("llama")
    base = [f"checkpoint.path={ck}", DRY, "memory.max_memory={cpu: 40KiB}"]
    with pytest.raises(UserError) as err:
        load([*base, "quantization=none", "dtype=fp32"], run_dir=tmp_path / "a")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("memory.max_memory.cpu: ")
    sizes = dict(re.findall(r"([\d.]+ [KM]iB) with (\S+?)[,;]", msg)[i][::-1] for i in range(3))
    assert set(sizes) == {"dtype=bf16", "quantization=int8", "quantization=nf4"}, msg
    assert "the model takes " in msg and "memory.max_memory.cpu=" in msg and "memory.max_memory.disk" in msg
    with pytest.raises(UserError, match=r"with quantization.unquantized_dtype=null[,;]"):
        load([*base, "quantization=int8", "dtype=bf16", "quantization.unquantized_dtype=fp32"], run_dir=tmp_path / "b")


def _gpu_plan(ck, tmp_path, *extra):
    """A dry run (instantiate_empty + plan) for a declared GPU whose cap forces layers onto the CPU."""
    import json

    r = load(
        [
            f"checkpoint.path={ck}",
            "stages=[instantiate_empty,plan]",
            "memory.max_memory={0: 150KiB, cpu: 1GiB}",
            *extra,
        ],
        run_dir=tmp_path,
    )
    return r.report, json.loads((tmp_path / "plan.json").read_text())


def test_offloaded_layers_quantized_on_the_cpu_or_kept(tiny, tmp_path):
    ck = tiny("llama")
    rep_q, plan_q = _gpu_plan(ck, tmp_path / "int8")
    rep_k, plan_k = _gpu_plan(ck, tmp_path / "keep", "quantization.offloaded=keep")
    cpu_linears = [n for n, t in plan_q["tensors"].items() if t["device"] == "cpu" and n.endswith("proj.weight")]
    assert cpu_linears, "the cap must put some layers on the CPU"
    for name in cpu_linears:  # offloaded=int8: int8 in CPU memory (they run there)
        assert plan_q["tensors"][name]["quantized"] == "int8" and plan_q["tensors"][name]["dtype"] == "int8"
        module = name.removesuffix(".weight")
        assert module in plan_q["quantized_modules"]
        if plan_k["tensors"][name]["device"] == "cpu":  # keep: load dtype, a stated reason
            assert "quantized" not in plan_k["tensors"][name] and plan_k["tensors"][name]["dtype"] == "float32"
            assert plan_k["skipped_modules"][module] == "offloaded to cpu with quantization.offloaded=keep"
    assert rep_q["plan"]["predicted_bytes"]["cpu"] < rep_k["plan"]["predicted_bytes"]["cpu"]
    # CPU-run modules keep their buffers on the CPU; kept (streamed) ones have them on the GPU
    assert all(t["device"] in ("0", "cpu") for t in plan_q["tensors"].values())


def _four_bit_layers(model):
    bnb = import_bitsandbytes()
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.mark.parametrize("method", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_four_bit_plan_is_exact(method, double_quant, tiny, tmp_path):
    r = load(
        [
            f"checkpoint.path={tiny('llama')}",
            f"quantization={method}",
            f"quantization.double_quant={double_quant}",
            "quantization.compute_dtype=fp32",
        ],
        run_dir=tmp_path / "r",
    )
    layers = _four_bit_layers(r.model)
    assert len(layers) == r.report["quantization"]["quantized"] == 21 and "lm_head" not in layers
    for m in layers.values():
        assert m.weight.quant_type == method and m.compute_dtype == torch.float32
        assert m.weight.quant_state.nested == double_quant and m.weight.dtype == torch.uint8
    v = r.report["validation"]
    assert all(v["checks"].values()) and v["plan_error"] == {"cpu": 0.0}
    assert v["measured_bytes"] == r.report["plan"]["predicted_bytes"]
    assert r.report["quantization"]["double_quant"] is double_quant


def test_four_bit_weights_match_transformers(tiny, tmp_path):
    """Our nf4 layers hold the bytes transformers' BitsAndBytesConfig(load_in_4bit) makes, and the same logits."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ck = tiny("llama", torch.bfloat16)
    ours = load([f"checkpoint.path={ck}", "quantization=nf4"], run_dir=tmp_path / "r").model
    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    theirs = AutoModelForCausalLM.from_pretrained(ck, quantization_config=cfg, device_map="cpu", dtype=torch.bfloat16)
    a = ours.get_submodule("model.layers.1.mlp.down_proj").weight
    b = theirs.get_submodule("model.layers.1.mlp.down_proj").weight
    assert torch.equal(a.data.view(-1), b.data.view(-1))
    assert torch.equal(a.quant_state.absmax, b.quant_state.absmax)
    for m in theirs.modules():  # compare the same kernels: keep transformers' layers in the canonical layout too
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    ids = torch.arange(24).unsqueeze(0) * 5 % 256
    with torch.inference_mode():
        assert torch.equal(ours(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits)
