"""Key conversions as transformers applies them (checkpoint/conversions.py), planned from headers alone.

Fused MoE experts, renames and splits are planned exactly (sources summed, at the target dtype),
assembled in place by either reader, and a checkpoint that matches neither the model nor a
conversion is refused at plan time (exit 2) before any tensor byte is read.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from architectures import BY_FAMILY
from helpers import run_cli
from safetensors.torch import load_file, save_file
from transformers import conversion_mapping
from transformers.core_model_loading import Interleave, Split, WeightConverter

from pipeline import load
from pipeline.errors import UserError

PLAN_ONLY = "stages=[instantiate_empty,plan]"


def _plan(path, tmp_path, *extra):
    result = load([f"checkpoint.path={path}", "quantization=none", PLAN_ONLY, *extra], run_dir=tmp_path / "plan")
    return json.loads((result.run_dir / "plan.json").read_text())


@pytest.mark.parametrize("dtype,size", [("fp32", 4), ("bf16", 2)])
def test_fused_experts_planned_from_headers_at_the_target_dtype(saved, tmp_path, dtype, size):
    path = saved("mixtral")
    doc = _plan(path, tmp_path, f"dtype={dtype}")
    fused = doc["tensors"]["model.layers.0.mlp.experts.gate_up_proj"]
    cfg = BY_FAMILY["mixtral"].kwargs
    experts, inter, hidden = cfg["num_local_experts"], cfg["intermediate_size"], cfg["hidden_size"]
    assert fused["shape"] == [experts, 2 * inter, hidden]
    assert fused["bytes"] == experts * 2 * inter * hidden * size  # the sum of its sources, at the target dtype
    sources = fused["conversion"]["sources"]
    assert sources[:2] == ["model.layers.0.block_sparse_moe.experts.0.w1.weight"] + [
        "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    ]
    assert len(sources) == 2 * experts and fused["conversion"]["ops"] == "MergeModulelist(dim=0), Concatenate(dim=1)"
    assert doc["tensors"]["model.layers.0.mlp.gate.weight"]["source"] == "model.layers.0.block_sparse_moe.gate.weight"


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_streamed_reader_assembles_fused_tensors_like_from_pretrained(family, saved, tmp_path):
    """The GPU reader's path (chunked preadv into landing buffers, then copied into each region), run on the CPU."""
    path = saved(family)
    result = load(
        [f"checkpoint.path={path}", "quantization=none", "dtype=bf16", "stages.load_shards.reader=stream"],
        run_dir=tmp_path / "run",
    )
    assert result.report["load"]["reader"]["mapped"] == 0
    assert result.report["validation"]["plan_error"] == {"cpu": 0.0}
    theirs = getattr(transformers, BY_FAMILY[family].model).from_pretrained(path, dtype=torch.bfloat16)
    ours = result.model.state_dict()
    for name, tensor in theirs.state_dict().items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def test_keys_that_match_nothing_fail_at_plan_time(saved, tmp_path):
    """GPT-NeoX's head under a name no conversion knows: exit 2 from plan, nothing read, the keys named."""
    dest = tmp_path / "ck"
    shutil.copytree(saved("gpt_neox"), dest)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    shard = dest / index["weight_map"].pop("embed_out.weight")
    tensors = load_file(shard)
    tensors["output_head.weight"] = tensors.pop("embed_out.weight")
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"]["output_head.weight"] = shard.name
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"keys output_head\.weight match no model tensor.*first lm_head\.weight"):
        load([f"checkpoint.path={dest}", "quantization=none"], run_dir=tmp_path / "run")
    proc = run_cli(f"checkpoint.path={dest}", "quantization=none", f"hydra.run.dir={tmp_path / 'cli'}")
    assert proc.returncode == 2 and "output_head.weight" in proc.stderr
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert [s["name"] for s in report["stages"]][-1] == "plan" and not report.get("load")


def _fuse_qkv(src, dest):
    """A Llama checkpoint with q/k/v saved as one `qkv_proj` tensor (as many community checkpoints do)."""
    shutil.copytree(src, dest)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    for layer in range(2):
        names = [f"model.layers.{layer}.self_attn.{p}_proj.weight" for p in "qkv"]
        parts = []
        for n in names:
            shard = dest / index["weight_map"].pop(n)
            tensors = load_file(shard)
            parts.append(tensors.pop(n))
            save_file(tensors, shard, metadata={"format": "pt"})
        fused = f"model.layers.{layer}.self_attn.qkv_proj.weight"
        save_file({fused: torch.cat(parts)}, dest / f"qkv-{layer}.safetensors", metadata={"format": "pt"})
        index["weight_map"][fused] = f"qkv-{layer}.safetensors"
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest


@pytest.fixture
def registered(monkeypatch):
    """A conversion registered for LlamaForCausalLM in transformers' own table (undone after the test)."""
    conversion_mapping.get_checkpoint_conversion_mapping("llama")  # builds the cache
    cache = conversion_mapping._checkpoint_conversion_mapping_cache

    def register(ops):
        converter = WeightConverter(
            "self_attn.qkv_proj.weight",
            ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
            operations=ops,
        )
        monkeypatch.setitem(cache, "LlamaForCausalLM", [converter])

    return register


def test_a_split_registered_in_transformers_is_followed(saved, tmp_path, registered):
    """Any mapping from_pretrained applies is ours too: here a user-registered Split of a fused qkv (GQA sizes)."""
    path = _fuse_qkv(saved("llama"), tmp_path / "ck")  # saved before registering (save_pretrained reverses it)
    registered([Split(dim=0)])
    result = load([f"checkpoint.path={path}", "quantization=int8", "dtype=fp32"], run_dir=tmp_path / "run")
    assert result.report["validation"]["plan_error"] == {"cpu": 0.0}
    theirs = transformers.LlamaForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True)
    )
    mine = dict(result.model.named_parameters())
    for name, p in theirs.named_parameters():
        assert torch.equal(mine[name].data, p.data), name
        if getattr(p, "SCB", None) is not None:  # ours ran validate's forward, which moves it into the state
            module = result.model.get_submodule(name.rpartition(".")[0])
            assert torch.equal(module.state.SCB if mine[name].SCB is None else mine[name].SCB, p.SCB), name


def test_an_op_we_do_not_interpret_is_refused_at_plan_time(saved, tmp_path, registered):
    path = _fuse_qkv(saved("llama"), tmp_path / "ck")
    registered([Interleave(dim=0)])
    with pytest.raises(UserError, match="with Interleave, a conversion the loader does not interpret"):
        load([f"checkpoint.path={path}", "quantization=none", PLAN_ONLY], run_dir=tmp_path / "run")


def test_fused_tensors_are_not_offloaded_to_disk(saved, tmp_path):
    with pytest.raises(UserError, match="gate_up_proj is assembled from 8 checkpoint tensors.*cannot be read in place"):
        load(
            [
                f"checkpoint.path={saved('mixtral')}",
                "quantization=none",
                "device_map=explicit",
                "device_map.map={model: disk, lm_head: disk}",
            ],
            run_dir=tmp_path / "run",
        )


def test_streamed_reference_assembles_fused_experts_from_the_files(saved, tmp_path):
    """validate's unquantized reference plans every weight on disk: fused experts are built at forward time.

    With every Linear layer skipped, the int8 run is the fp32 model: its logits equal the reference's exactly.
    """
    result = load(
        [f"checkpoint.path={saved('mixtral')}", "quantization=int8", "quantization.skip_modules=[self_attn]"],
        run_dir=tmp_path / "run",
    )
    metrics = result.report["validation"]["metrics"]
    assert result.report["quantization"]["quantized"] == 0
    assert metrics["reference"].startswith("unquantized, streamed") and metrics["logits_rel_error"] == 0.0


def test_legacy_layernorm_gamma_beta_names(saved, tmp_path):
    """Old BERT checkpoints name LayerNorm weights gamma/beta: transformers' legacy renames apply here too."""
    dest = tmp_path / "ck"
    shutil.copytree(saved("bert"), dest)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    for shard in sorted({dest / f for f in index["weight_map"].values()}):
        tensors = load_file(shard)
        renamed = {
            k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
            for k, v in tensors.items()
        }
        save_file(renamed, shard, metadata={"format": "pt"})
    index["weight_map"] = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in index["weight_map"].items()
    }
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    assert any(k.endswith("LayerNorm.gamma") for k in index["weight_map"])
    result = load([f"checkpoint.path={dest}", "quantization=none", "dtype=fp32"], run_dir=tmp_path / "run")
    assert result.report["status"] == "ok" and not result.report["load"]["unexpected_keys"]
    theirs = transformers.BertForMaskedLM.from_pretrained(dest, dtype=torch.float32).state_dict()
    ours = result.model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())
