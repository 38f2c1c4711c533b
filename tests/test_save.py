"""The save stage: a saved int8 checkpoint reloads without quantizing, bit for bit, same logits."""

import pytest
import torch
from helpers import tree_digest

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
