"""The save stage: a saved int8/4-bit checkpoint reloads without quantizing, bit for bit, here and in transformers."""

import json

import pytest
import torch
from helpers import assert_same_tensors, bnb_reference, tree_digest

from pipeline import load
from pipeline.errors import UserError
from pipeline.quant.bnb import import_bitsandbytes

SAVE = "stages=[instantiate_empty,plan,quantize,load_shards,validate,save]"


def _int8_state(model):
    bnb = import_bitsandbytes()
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            out[name] = (m.weight.data.clone(), (m.weight.SCB if m.weight.SCB is not None else m.state.SCB).clone())
    return out


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_saved_int8_reloads_bit_for_bit(arch, tiny, tmp_path):
    src = tiny(arch)
    before = tree_digest(src)
    first = load(
        [
            f"checkpoint.path={src}",
            "quantization.overrides={dense_4h_to_h: 2.0, down_proj: 2.0}",
            SAVE,
            f"stages.save.path={tmp_path / 'int8'}",
        ],
        run_dir=tmp_path / "a",
    )
    assert first.report["save"]["tensors"] > 0 and tree_digest(src) == before
    again = load([f"checkpoint.path={tmp_path / 'int8'}"], run_dir=tmp_path / "b")
    r = again.report
    assert r["status"] == "ok" and r["validation"]["plan_error"] == {"cpu": 0.0}
    assert r["quantization"]["quantized"] == first.report["quantization"]["quantized"] > 0
    assert r["quantization"]["thresholds"] == first.report["quantization"]["thresholds"] != {}
    a, b = _int8_state(first.model), _int8_state(again.model)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1]), name
    sa, sb = first.model.state_dict(), again.model.state_dict()
    for key, value in sa.items():
        if value.dtype != torch.int8:
            assert torch.equal(value, sb[key]), key
    ids = torch.arange(16).unsqueeze(0)
    with torch.inference_mode():
        assert torch.equal(first.model(ids).logits, again.model(ids).logits)


def test_save_never_writes_into_the_source(tiny, tmp_path):
    src = tiny("llama")
    with pytest.raises(UserError, match="is inside the source checkpoint"):
        load([f"checkpoint.path={src}", SAVE, f"stages.save.path={src / 'int8'}"], run_dir=tmp_path / "a")
    assert not (src / "int8").exists()


def test_save_refuses_a_non_empty_destination(tiny, tmp_path):
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not empty"):
        load([f"checkpoint.path={tiny('llama')}", SAVE, f"stages.save.path={dest}"], run_dir=tmp_path / "a")
    assert (dest / "keep.txt").read_text() == "mine"


def test_save_needs_a_path(tiny, tmp_path):
    with pytest.raises(UserError, match="stages.save.path"):
        load([f"checkpoint.path={tiny('llama')}", SAVE], run_dir=tmp_path / "a")


@pytest.mark.parametrize(
    ("arch", "method", "source_dtype"),
    [
        ("llama", "int8", torch.bfloat16),
        ("llama", "nf4", torch.float32),
        ("llama", "fp4", torch.float32),
        ("gpt2", "int8", torch.float32),
        ("gpt2", "nf4", torch.float32),
    ],
)
def test_saved_checkpoint_is_what_transformers_reads_back(arch, method, source_dtype, tiny, tmp_path):
    """ours -> transformers: from_pretrained on our output builds the same bnb layers (int8 CB/SCB, 4-bit
    quant_state) and logits as our loaded model; and our pipeline reloads it bit for bit. GPT-2's Conv1D
    layers are quantized transposed, as transformers does."""
    from transformers import BitsAndBytesConfig

    dest = tmp_path / method
    first = load(
        [f"checkpoint.path={tiny(arch, source_dtype)}", f"quantization={method}", SAVE, f"stages.save.path={dest}"],
        run_dir=tmp_path / "a",
    )
    config = json.loads((dest / "config.json").read_text())
    if method == "int8":  # the rest follows dtype (auto: the source's, issue 29): said in config.json
        assert config["dtype"] == str(source_dtype).removeprefix("torch.")
        expected = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_skip_modules=["lm_head"])
    else:
        expected = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=method,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=["lm_head"],
        )
    assert config["quantization_config"] == json.loads(json.dumps(expected.to_dict()))
    theirs = bnb_reference(dest)
    again = load([f"checkpoint.path={dest}", f"quantization={method}"], run_dir=tmp_path / "b")
    assert again.report["status"] == "ok" and again.report["validation"]["plan_error"] == {"cpu": 0.0}
    assert again.report["quantization"]["quantized"] == first.report["quantization"]["quantized"] > 0
    ids = torch.arange(16).unsqueeze(0)
    with torch.inference_mode():
        logits = first.model(ids).logits
        assert torch.equal(logits, theirs(ids).logits) and torch.equal(logits, again.model(ids).logits)
    # compared after a forward on each: Linear4bit casts its bias to the compute dtype then (our plan has it so)
    assert assert_same_tensors(first.model, theirs) > 0
    assert assert_same_tensors(again.model, theirs) > 0


def test_an_int8_save_without_quantization_config_still_loads_as_saved(tiny, tmp_path):
    """Directories our save wrote before it wrote quantization_config carry only our metadata: still int8."""
    dest = tmp_path / "int8"
    first = load(
        [
            f"checkpoint.path={tiny('llama')}",
            "quantization.overrides={down_proj: 2.0}",
            SAVE,
            f"stages.save.path={dest}",
        ],
        run_dir=tmp_path / "a",
    )
    config = json.loads((dest / "config.json").read_text())
    del config["quantization_config"]
    (dest / "config.json").write_text(json.dumps(config))
    again = load([f"checkpoint.path={dest}", "quantization=none"], run_dir=tmp_path / "b")
    r = again.report
    assert r["status"] == "ok" and r["quantization"]["prequantized"] is True
    assert r["quantization"]["quantized"] == first.report["quantization"]["quantized"] > 0
    assert r["quantization"]["threshold"] == 6.0  # quantization=none: the saved threshold
    assert r["quantization"]["thresholds"] == first.report["quantization"]["thresholds"] != {}
    assert _int8_state(again.model).keys() == _int8_state(first.model).keys()
    for name, (cb, scb) in _int8_state(first.model).items():
        other = _int8_state(again.model)[name]
        assert torch.equal(cb, other[0]) and torch.equal(scb, other[1]), name
