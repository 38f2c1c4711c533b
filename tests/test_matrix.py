"""Issue 29, "right in every combination": families x quantization x placement x dtype, on the CPU.

Families: a tied head (Llama, tie_word_embeddings=True), an untied head (Qwen2), MoE experts
(Mixtral, fused from per-expert tensors), an encoder-decoder (T5, tied). Quantization none, int8,
nf4. Placement: one device; CPU + disk with the head (and what is tied to it) on disk; CPU + disk
with the no-split blocks (the layers) on disk and the head on the CPU. dtype fp32 and bf16.

Every cell either loads with status ok, plan error 0 and every check passing, and gives the logits
of the same configuration loaded on one device, bit for bit; or is refused at plan time with the
one-line reason REFUSED names. Layers on disk are read in place from the checkpoint and so never
quantized (docs/quantization.md): their one-device reference skips the same layers. The table of
outcomes is docs/matrix.md.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from architectures import BY_FAMILY, DECODER, Arch, build, inputs_for

from pipeline import load
from pipeline.errors import UserError

FAMILIES = {
    "llama_tied": Arch("llama", "LlamaConfig", "LlamaForCausalLM", dict(DECODER, tie_word_embeddings=True)),
    "qwen2_untied": Arch("qwen2", "Qwen2Config", "Qwen2ForCausalLM", dict(DECODER, tie_word_embeddings=False)),
    "mixtral_moe": BY_FAMILY["mixtral"],
    "t5_enc_dec": BY_FAMILY["t5"],
}
# prequantized_*: a checkpoint transformers quantized and saved (as downloaded from the Hub), loaded as saved
QUANTIZATION = ("none", "int8", "nf4", "prequantized_int8", "prequantized_nf4")
PLACEMENTS = ("one_device", "head_on_disk", "layers_on_disk")
DTYPES = ("fp32", "bf16")
CELLS = list(itertools.product(FAMILIES, QUANTIZATION, PLACEMENTS, DTYPES))
NO_METRICS = [f"stages.validate.metrics.{m}=false" for m in ("perplexity", "reference", "greedy", "throughput")]

# (family, quantization or None for any, placement) -> a regex the one-line reason the plan gives starts with.
SAVED_ON_DISK = r"device_map\.map: \S+ is saved as (int8|nf4) and would be offloaded to disk; saved \1 layers run on"
REFUSED = {
    ("mixtral_moe", None, "layers_on_disk"): (
        r"device_map\.map: model\.layers\.0\.mlp\.experts\.gate_up_proj is assembled from|" + SAVED_ON_DISK
    ),
    **{(f, q, "layers_on_disk"): SAVED_ON_DISK for f in FAMILIES for q in ("prequantized_int8", "prequantized_nf4")},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    cache: dict = {}

    def get(family: str, quant: str = "none"):
        if (family, quant) not in cache:
            if quant.startswith("prequantized_"):
                src = get(family)
                kind = quant.removeprefix("prequantized_")
                cache[family, quant] = _saved_quantized(src, tmp_path_factory.mktemp(f"{family}_{kind}"), kind)
            else:
                cache[family, quant] = build(FAMILIES[family], tmp_path_factory.mktemp(family), shards=3)
        return cache[family, quant]

    return get


def _saved_quantized(src, dest, kind: str):
    """What a user downloads as a pre-quantized model: transformers quantizes and saves it (its own class)."""
    import transformers
    from helpers import BNB_KINDS
    from transformers import AutoConfig, BitsAndBytesConfig

    cls = getattr(transformers, AutoConfig.from_pretrained(src).architectures[0])
    model = cls.from_pretrained(src, quantization_config=BitsAndBytesConfig(**BNB_KINDS[kind]))
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(dest, max_shard_size=max(total // 3, 1))
    return dest


@pytest.fixture(scope="module")
def references():
    return {}


def _skeleton(path):
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        model = getattr(transformers, config.architectures[0])(config)
    model.tie_weights()
    return model


def _explicit_map(path, placement: str) -> str:
    """device_map.map for the placement: every top-level module on the CPU, the chosen ones on disk."""
    model = _skeleton(path)
    entries = {name: "cpu" for name, _ in model.named_children()}
    if placement == "head_on_disk":
        head = model.get_output_embeddings().weight
        for name, module in model.named_modules():
            if any(p is head for p in module.parameters(recurse=False)):
                entries[name] = "disk"  # the head and every module tied to it
    else:
        blocks = set(model._no_split_modules or ())
        entries.update({n: "disk" for n, m in model.named_modules() if type(m).__name__ in blocks})
    return "device_map.map={" + ", ".join(f"{k}: {v}" for k, v in entries.items()) + "}"


def _overrides(path, quant: str, placement: str, dtype: str) -> list[str]:
    method = "none" if quant.startswith("prequantized_") else quant  # a pre-quantized checkpoint loads as saved
    out = [f"checkpoint.path={path}", f"quantization={method}", f"dtype={dtype}", *NO_METRICS]
    if placement == "one_device":
        return [*out, "device_map=cpu"]
    return [*out, "device_map=explicit", _explicit_map(path, placement)]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs_for(model)).logits


def _reference(references, path, quant, dtype, skipped, tmp_path) -> torch.Tensor:
    """Logits of the same configuration on one device (with the same layers left unquantized)."""
    key = (str(path), quant, dtype, tuple(skipped))
    if key not in references:
        extra = [f"quantization.skip_modules=[{','.join(skipped)}]"] if skipped else []
        r = load([*_overrides(path, quant, "one_device", dtype), *extra], run_dir=tmp_path / "reference")
        references[key] = _logits(r.model)
    return references[key]


def test_matrix_size():
    print(
        f"\ncombination matrix: {len(CELLS)} cells ({len(FAMILIES)} families x {len(QUANTIZATION)} quantization x "
        f"{len(PLACEMENTS)} placements x {len(DTYPES)} dtypes)"
    )
    assert len(CELLS) == 120


@pytest.mark.parametrize(("family", "quant", "placement", "dtype"), CELLS, ids=["-".join(c) for c in CELLS])
def test_cell(family, quant, placement, dtype, checkpoints, references, tmp_path):
    path = checkpoints(family, quant)
    overrides = _overrides(path, quant, placement, dtype)
    refused = REFUSED.get((family, quant, placement)) or REFUSED.get((family, None, placement))
    if refused is not None:
        with pytest.raises(UserError) as err:
            dry = [o for o in overrides if o not in NO_METRICS]  # a dry run has no validate stage
            load([*dry, "+experiment=dry_run"], run_dir=tmp_path / "run")  # refused before any byte is read
        assert re.match(refused, str(err.value)) and "\n" not in str(err.value), str(err.value)
        return
    r = load(overrides, run_dir=tmp_path / "run")
    report = r.report
    assert report["status"] == "ok"
    assert all(report["validation"]["checks"].values()), report["validation"]["checks"]
    assert set(report["validation"]["plan_error"].values()) == {0.0}, report["validation"]["plan_error"]
    if placement != "one_device":
        assert "disk" in report["plan"]["predicted_bytes"]
    reasons = report.get("quantization", {}).get("skipped_reasons", {})
    skipped = sorted(m for m, why in reasons.items() if why.startswith("offloaded to disk"))
    logits = _logits(r.model)
    if placement == "one_device":
        references.setdefault((str(path), quant, dtype, ()), logits)
    expected = _reference(references, path, quant, dtype, skipped, tmp_path)
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_saved_quantized_on_disk_names_the_caps_when_caps_placed_it(kind, checkpoints, tmp_path):
    """The refusal names the key that put the layer on disk: the caps here, device_map.map in the cells above."""
    path = checkpoints("qwen2_untied", f"prequantized_{kind}")
    overrides = [f"checkpoint.path={path}", "quantization=none", "device_map=auto", "+experiment=dry_run"]
    with pytest.raises(UserError) as err:
        load([*overrides, "memory.max_memory={cpu: 20KiB, disk: 1GiB}"], run_dir=tmp_path / "run")
    message = str(err.value)
    assert re.match(SAVED_ON_DISK.replace("device_map\\.map", "memory\\.max_memory"), message), message
    assert message.endswith("raise the caps") and "\n" not in message
