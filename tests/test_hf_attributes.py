"""The loaded model carries what from_pretrained sets: quantization flags, hf_quantizer, hf_device_map."""

from __future__ import annotations

import pytest
import torch
from helpers import BNB_KINDS, assert_same_tensors, bnb_reference

from pipeline import load
from pipeline.loading.hf_attributes import hf_device_map


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_quantized_model_carries_what_transformers_sets(method, tiny, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    src = tiny("llama")
    ours = load([f"checkpoint.path={src}", f"quantization={method}"], run_dir=tmp_path / "r").model
    theirs = AutoModelForCausalLM.from_pretrained(src, quantization_config=BitsAndBytesConfig(**BNB_KINDS[method]))
    for attr in ("is_quantized", "quantization_method", "is_loaded_in_8bit", "is_loaded_in_4bit"):
        assert getattr(ours, attr, None) == getattr(theirs, attr, None), attr
    assert type(ours.hf_quantizer) is type(theirs.hf_quantizer)
    assert type(ours.config.quantization_config) is type(theirs.config.quantization_config)
    assert (
        ours.config.quantization_config.quantization_method() == theirs.config.quantization_config.quantization_method()
    )
    assert ours.config._is_quantized and theirs.config._is_quantized
    assert not hasattr(ours, "hf_device_map") and not hasattr(theirs, "hf_device_map")  # one device: unset


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_model_save_pretrained_is_loadable_by_transformers(method, tiny, tmp_path):
    """transformers' own int8/4-bit models can save_pretrained; ours too, and transformers loads the result."""
    ours = load([f"checkpoint.path={tiny('llama')}", f"quantization={method}"], run_dir=tmp_path / "r").model
    ours.save_pretrained(tmp_path / "out")
    theirs = bnb_reference(tmp_path / "out")
    assert assert_same_tensors(ours, theirs) > 0
    ids = torch.arange(16).unsqueeze(0)
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_hf_device_map_is_in_accelerates_format(tiny, tmp_path):
    result = load(
        [f"checkpoint.path={tiny('llama')}", "quantization=none", "memory.max_memory={cpu: 200KiB, disk: 1GiB}"],
        run_dir=tmp_path / "r",
    )
    planned = result.report["plan"]["device_map"]
    assert set(planned.values()) == {"cpu", "disk"}
    assert result.model.hf_device_map == planned
    assert hf_device_map({"model.layers.0": "0", "model.layers.1": "1", "lm_head": "cpu", "x": "disk"}) == {
        "model.layers.0": 0,
        "model.layers.1": 1,
        "lm_head": "cpu",
        "x": "disk",
    }


def test_peft_sees_a_bitsandbytes_model(tiny, tmp_path):
    """peft's k-bit path (prepare_model_for_kbit_training, LoRA on bnb layers) works on our int8 model as on
    transformers' own: the same bnb LoRA layers, the same loss, gradients on the adapters."""
    peft = pytest.importorskip("peft")  # in the test extra (pyproject.toml)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    src = tiny("llama")
    ours = load([f"checkpoint.path={src}", "quantization=int8"], run_dir=tmp_path / "r").model
    theirs = AutoModelForCausalLM.from_pretrained(src, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    ids = torch.arange(16).unsqueeze(0)
    losses, layers = [], []
    for model in (ours, theirs):
        torch.manual_seed(0)
        model = peft.prepare_model_for_kbit_training(model)
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        lora = [p for n, p in wrapped.named_parameters() if "lora_" in n]
        assert lora and all(p.grad is not None for p in lora)
        losses.append(loss.detach())
        layers.append(type(wrapped.base_model.model.model.layers[0].self_attn.q_proj))
    assert layers[0] is layers[1] and layers[0].__module__ == "peft.tuners.lora.bnb"
    assert torch.equal(losses[0], losses[1])
