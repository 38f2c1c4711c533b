"""Pre-quantized bitsandbytes checkpoints saved by transformers load as saved, bit-identical to from_pretrained."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import assert_same_tensors, bnb_reference, run_cli, save_bnb_quantized, tree_digest

from pipeline import load
from pipeline.errors import UserError
from pipeline.quant.bnb import import_bitsandbytes

DRY = "stages=[instantiate_empty,plan]"
IDS = torch.arange(24).unsqueeze(0)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """saved("nf4") -> a directory transformers quantized and saved (built once per kind and architecture)."""
    cache = {}

    def get(kind: str, arch: str = "llama"):
        if (kind, arch) not in cache:
            cache[kind, arch] = save_bnb_quantized(tiny(arch), tmp_path_factory.mktemp(f"{arch}-{kind}"), kind)
        return cache[kind, arch]

    return get


def _quantized_layers(model) -> int:
    bnb = import_bitsandbytes()
    return sum(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in model.modules())


@pytest.mark.parametrize(
    ("arch", "kind", "method", "extra"),
    [
        ("llama", "int8", "int8", []),
        ("llama", "nf4", "nf4", ["quantization.compute_dtype=fp32"]),
        ("llama", "nf4-single", "nf4", ["quantization.compute_dtype=fp32"]),
        ("llama", "fp4", "fp4", ["quantization.compute_dtype=fp32"]),
        ("llama", "int8", "none", []),
        ("llama", "nf4", "none", []),
        ("gpt2", "int8", "none", []),  # Conv1D layers: transformers quantizes them, weights (out, in)
        ("gpt2", "nf4", "none", []),
    ],
)
def test_transformers_bnb_checkpoint_loads_as_saved(saved, arch, kind, method, extra, tmp_path):
    path = saved(kind, arch)
    before = tree_digest(path)
    result = load([f"checkpoint.path={path}", f"quantization={method}", *extra], run_dir=tmp_path / "r")
    r = result.report
    assert r["status"] == "ok", r["validation"]
    assert r["validation"]["plan_error"] == {"cpu": 0.0}
    theirs = bnb_reference(path)
    assert r["quantization"]["method"] == kind.split("-")[0] and r["quantization"]["prequantized"] is True
    assert r["quantization"]["quantized"] == _quantized_layers(theirs) == _quantized_layers(result.model) > 0
    assert r["load"]["unexpected_keys"] == [] and r["load"]["missing_keys"] == []
    assert assert_same_tensors(result.model, theirs) > 0  # before any forward: exactly what transformers built
    with torch.inference_mode():
        assert torch.equal(result.model(IDS).logits, theirs(IDS).logits)
    assert tree_digest(path) == before


def _scales(module):
    """Int8Params keep SCB until the first forward; Linear8bitLt then holds it in its state."""
    return module.weight.SCB if module.weight.SCB is not None else module.state.SCB


def test_int8_codes_and_scales_are_the_saved_ones(saved, tmp_path):
    path = saved("int8")
    ours = load([f"checkpoint.path={path}"], run_dir=tmp_path / "r").model
    theirs = bnb_reference(path)
    bnb = import_bitsandbytes()
    layers = {n: m for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    for name, module in layers.items():
        mine = ours.get_submodule(name)
        assert mine.weight.dtype == torch.int8 and torch.equal(mine.weight.data, module.weight.data), name
        assert torch.equal(_scales(mine), _scales(module)), name


def test_four_bit_quant_state_is_the_saved_one(saved, tmp_path):
    path = saved("nf4")
    ours = load([f"checkpoint.path={path}", "quantization=none"], run_dir=tmp_path / "r").model
    theirs = bnb_reference(path)
    bnb = import_bitsandbytes()
    for name, module in theirs.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        a, b = ours.get_submodule(name).weight.quant_state, module.weight.quant_state
        assert (a.quant_type, a.blocksize, a.dtype, tuple(a.shape), a.nested) == (
            b.quant_type,
            b.blocksize,
            b.dtype,
            tuple(b.shape),
            b.nested,
        )
        assert torch.equal(a.absmax, b.absmax) and torch.equal(a.code, b.code) and torch.equal(a.offset, b.offset)
        assert torch.equal(a.state2.absmax, b.state2.absmax) and torch.equal(a.state2.code, b.state2.code)


def test_plan_is_exact_from_headers_alone(saved, tmp_path):
    """A dry run reads no tensor byte, yet predicts what the loaded model holds."""
    path = saved("nf4")
    dry = load([f"checkpoint.path={path}", "quantization=none", DRY], run_dir=tmp_path / "dry").report
    full = load([f"checkpoint.path={path}", "quantization=none"], run_dir=tmp_path / "full").report
    assert dry["plan"]["predicted_bytes"] == full["validation"]["measured_bytes"]
    plan = json.loads((tmp_path / "dry" / "plan.json").read_text())
    q = plan["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert q["quantized"] == "nf4" and q["dtype"] == "uint8" and q["shape"] == [64, 64]


@pytest.mark.parametrize(("kind", "asked"), [("int8", "nf4"), ("nf4", "int8"), ("nf4", "fp4"), ("fp4", "nf4")])
def test_a_contradicting_method_is_refused_at_plan_time(saved, kind, asked, tmp_path):
    with pytest.raises(UserError) as err:
        load([f"checkpoint.path={saved(kind)}", f"quantization={asked}", DRY], run_dir=tmp_path / "r")
    message = str(err.value)
    assert f"quantization={asked}" in message and f"already {kind.split('-')[0]}" in message
    assert "config.json quantization_config" in message


def test_a_contradicting_method_exits_2_from_the_cli(saved, tmp_path):
    p = run_cli(f"checkpoint.path={saved('int8')}", "quantization=nf4", f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 2, p.stderr
    assert "quantization=nf4" in p.stderr and "already int8" in p.stderr and "Traceback" not in p.stderr


def _with_config(src, dest, mutate):
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    mutate(config)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize(
    ("source", "mutate", "expected"),
    [
        (
            "plain",
            lambda c: c.update(quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True}),
            "no <module>.SCB",
        ),
        (
            "nf4",
            lambda c: c["quantization_config"].update(bnb_4bit_quant_type="fp4"),
            "says fp4 but the checkpoint holds nf4",
        ),
        (
            "int8",
            lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}),
            "quant_method 'gptq' is not supported",
        ),
        (
            "int8",
            lambda c: c["quantization_config"].update(load_in_8bit=False, _load_in_8bit=False),
            "neither load_in_8bit",
        ),
    ],
)
def test_an_inconsistent_quantization_config_is_refused(saved, tiny, tmp_path, source, mutate, expected):
    src = tiny("llama") if source == "plain" else saved(source)
    path = _with_config(src, tmp_path / "ckpt", mutate)
    with pytest.raises(UserError, match="config.json quantization_config") as err:
        load([f"checkpoint.path={path}", "quantization=none", DRY], run_dir=tmp_path / "r")
    assert expected in str(err.value)


def test_stats_in_another_shard_than_their_weight(tiny, tmp_path):
    """transformers' save_pretrained splits a weight from its stats across shards; each is read where it lies."""
    path = save_bnb_quantized(tiny("llama"), tmp_path / "nf4", "nf4", shards=40)
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    split = [
        k for k in weight_map if ".weight." in k and weight_map[k] != weight_map[k.split(".weight.")[0] + ".weight"]
    ]
    assert split, "the fixture no longer splits a weight from its stats"
    r = load([f"checkpoint.path={path}", "quantization=none"], run_dir=tmp_path / "r")
    assert r.report["status"] == "ok" and r.report["validation"]["plan_error"] == {"cpu": 0.0}
    assert_same_tensors(r.model, bnb_reference(path))


def test_settings_a_saved_checkpoint_has_decided_are_warned_not_silently_dropped(saved, tmp_path):
    """quantization.offloaded=keep cannot apply to saved layers (no unquantized weights): said, in the report."""
    path = saved("int8")
    overrides = [f"checkpoint.path={path}", "quantization=int8", "quantization.offloaded=keep"]
    r = load([*overrides, "stages=[instantiate_empty,plan,quantize]"], run_dir=tmp_path / "r").report
    assert any(w.startswith("quantization.offloaded=keep: ignored") for w in r["quantization"]["warnings"]), r
    plain = load(
        [f"checkpoint.path={path}", "quantization=int8", "stages=[instantiate_empty,plan,quantize]"],
        run_dir=tmp_path / "p",
    ).report
    assert not any("offloaded" in w for w in plain["quantization"]["warnings"])
