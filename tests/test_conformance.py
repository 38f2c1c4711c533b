"""Conformance with transformers: one tiny random model per family (tests/architectures.py), saved by
save_pretrained into several shards, loaded by the pipeline and by `from_pretrained` from the same
directory with the same dtype or quantization: every parameter and buffer bit-equal (int8 codes and
row scales, 4-bit codes and quantization state), the same logits and greedy tokens, plan error 0.

int8 models handed back run torch's and bitsandbytes' own kernels, as transformers' int8 model does
(portable numerics belong to validate's measurements, quant/cpu_numerics.py), so their logits are compared
bit for bit too.

The one deliberate difference: under bf16/fp16 we keep `_keep_in_fp32_modules` in fp32 (transformers
does only under fp16); the bf16 reference is then transformers' bf16 load with those tensors taken from
its fp32 load, which is exactly what our policy means (docs/architectures.md).
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from architectures import ARCHITECTURES, BY_FAMILY, inputs_for, is_text_model

from pipeline import load
from pipeline.measure.memory import measured_bytes

NO_METRICS = [f"stages.validate.metrics.{m}=false" for m in ("perplexity", "reference", "greedy", "throughput")]
MODES = {
    "fp32": (["quantization=none", "dtype=fp32"], dict(dtype=torch.float32)),
    "bf16": (["quantization=none", "dtype=bf16"], dict(dtype=torch.bfloat16)),
    "int8": (
        ["quantization=int8", "dtype=fp32"],
        dict(dtype=torch.float32, quantization_config=dict(load_in_8bit=True)),
    ),
    "int8-bf16": (
        ["quantization=int8", "dtype=bf16", "quantization.unquantized_dtype=null"],
        dict(dtype=torch.bfloat16, quantization_config=dict(load_in_8bit=True)),
    ),
    "nf4": (
        ["quantization=nf4", "dtype=fp32", "quantization.compute_dtype=fp32"],
        dict(
            dtype=torch.float32,
            quantization_config=dict(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            ),
        ),
    ),
}
CASES = [(a.family, mode) for a in ARCHITECTURES for mode in ("fp32", "bf16", "int8")]
CASES += [(family, "nf4") for family in ("llama", "gpt2", "mixtral", "t5", "bert")]
CASES += [(family, "int8-bf16") for family in ("llama", "gpt2", "mixtral")]


def _theirs(path, arch, mode: str):
    kwargs = dict(MODES[mode][1])
    if "quantization_config" in kwargs:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(**kwargs["quantization_config"])
    model = getattr(transformers, arch.model).from_pretrained(path, **kwargs).eval()
    if mode in ("bf16", "int8-bf16"):
        _keep_fp32_like_us(model, path, arch)
    for module in model.modules():  # we keep 4-bit weights in bitsandbytes' canonical layout on every CPU
        if getattr(module, "support_avx512bf16_for_cpu", False):  # (docs/quantization.md); so does the reference
            module.support_avx512bf16_for_cpu = False
    return model


def _keep_fp32_like_us(model, path, arch) -> None:
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if not keep:
        return
    fp32 = dict(getattr(transformers, arch.model).from_pretrained(path, dtype=torch.float32).named_parameters())
    for name, _p in list(model.named_parameters()):
        if any(re.search(k, name) for k in keep):
            mod_name, _, leaf = name.rpartition(".")
            model.get_submodule(mod_name)._parameters[leaf] = torch.nn.Parameter(fp32[name], requires_grad=False)


def _ours(path, mode: str, run_dir):
    overrides = [f"checkpoint.path={path}", *MODES[mode][0]]
    overrides += NO_METRICS  # validate's checks run for every kind (pixel and audio inputs built from the config)
    return load(overrides, run_dir=run_dir)


def _tensors(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, plus bitsandbytes' int8 row scales and 4-bit quantization state."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = p
        module = model.get_submodule(name.rpartition(".")[0])
        scb = getattr(p, "SCB", None)
        if (
            scb is None and type(module).__name__ == "Linear8bitLt" and name.endswith(".weight")
        ):  # moved into its state by a first forward
            scb = module.state.SCB
        if scb is not None:
            out[f"{name}:SCB"] = scb
        state = getattr(p, "quant_state", None)
        if state is not None:
            for key, value in state.as_dict(packed=False).items():
                if isinstance(value, torch.Tensor):
                    out[f"{name}:{key}"] = value
    for name, b in model.named_buffers(remove_duplicate=False):
        out[name] = b
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _assert_same_tensors(ours, theirs) -> None:
    a, b = _tensors(ours), _tensors(theirs)
    assert sorted(a) == sorted(b)
    for name, t in b.items():
        assert a[name].dtype == t.dtype, f"{name}: {a[name].dtype} vs {t.dtype}"
        assert a[name].shape == t.shape, f"{name}: {tuple(a[name].shape)} vs {tuple(t.shape)}"
        assert torch.equal(_bits(a[name]), _bits(t)), f"{name}: bits differ"


def _plan_error(result) -> dict:
    if result.report.get("validation"):
        return result.report["validation"]["plan_error"]
    predicted = result.report["plan"]["predicted_bytes"]
    measured = measured_bytes(result.model)
    return {d: (measured.get(d, 0) - p) / p for d, p in predicted.items()}


@pytest.mark.parametrize("family,mode", CASES)
def test_loads_like_from_pretrained(family, mode, saved, tmp_path):
    arch, path = BY_FAMILY[family], saved(family)
    theirs = _theirs(path, arch, mode)
    result = _ours(path, mode, tmp_path / "run")
    ours = result.model
    assert result.report["status"] == "ok", result.report["error"]
    assert type(ours) is type(theirs)
    assert "forward" not in ours.__dict__  # torch's and bitsandbytes' own kernels, as theirs (issue 30)
    assert all(e == 0.0 for e in _plan_error(result).values()), _plan_error(result)
    _assert_same_tensors(ours, theirs)
    inputs = inputs_for(theirs)
    with torch.no_grad():
        mine, ref = ours(**inputs), theirs(**inputs)
    key = "logits" if "logits" in ref else "last_hidden_state"
    assert torch.equal(mine[key], ref[key])
    if is_text_model(theirs) and theirs.can_generate():
        settings = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4)
        ids = {"input_ids": inputs["input_ids"]}
        assert torch.equal(ours.generate(**ids, **settings), theirs.generate(**ids, **settings))
    if mode in ("int8", "int8-bf16", "nf4"):
        n = result.report["quantization"]["quantized"]
        assert n == sum(hasattr(m, "source_cls") for m in theirs.modules()), "same layers quantized"
