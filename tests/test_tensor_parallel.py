"""Tensor parallel: real 2-process gloo runs through torchrun and the CLI, 4-rank dry-run plans, bad input.

The torchrun runs are the user's command (`torchrun --nproc_per_node 2 -m pipeline parallel=tensor ...`)
in a subprocess: two real processes, a real gloo process group, transformers' own tensor-parallel hooks.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_cli, tree_digest
from packaging.version import Version

from pipeline import load
from pipeline.checkpoint import open_checkpoint
from pipeline.errors import UserError
from pipeline.hf import installed
from pipeline.hf.tensor_parallel import OLDEST_WITH_API
from pipeline.measure import quality

DRY = "stages=[instantiate_empty,plan]"
# transformers older than 5.24 lacks the tensor-parallel API: tests/test_hf_adapter.py checks its exit 2 there
pytestmark = pytest.mark.skipif(
    Version(installed()) < Version(OLDEST_WITH_API), reason=f"parallel=tensor needs transformers>={OLDEST_WITH_API}"
)


def _torchrun(*args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PIPELINE_DEBUG", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "pipeline", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _four_heads_llama(dest: Path) -> Path:
    """A tiny Llama whose 4 key/value heads can be cut over 4 ranks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).eval().save_pretrained(dest, max_shard_size=60_000)
    return dest


def _single_process_logits(path, quantization: str, run_dir) -> torch.Tensor:
    result = load([f"checkpoint.path={path}", f"quantization={quantization}"], run_dir=run_dir)
    out, _ = quality.forward_output(result.model, quality.fixed_inputs(result.model).kwargs)
    return out


def _whole_bytes(path, plan_doc: dict) -> int:
    """Checkpoint bytes of the tensors every rank reads whole (no slice in the rank plan)."""
    ck = open_checkpoint(str(path))
    tensors = plan_doc["parallel"]["ranks"][0]["tensors"]
    sources = {t.get("source", n) for n, t in tensors.items() if "slice" not in t and not t.get("tied_to")}
    return sum(ck.tensors[k].nbytes for k in sources if k in ck.tensors)


@pytest.fixture(scope="module")
def tp_runs(tiny, tmp_path_factory):
    """One fp32 and one int8 2-process load of the tiny Llama, each run once for the tests below."""
    path = tiny("llama")
    before = tree_digest(path)
    runs = {}
    for quant in ("none", "int8"):
        out = tmp_path_factory.mktemp(f"tp_{quant}") / "run"
        p = _torchrun(
            "checkpoint=hf_dir",
            f"checkpoint.path={path}",
            "parallel=tensor",
            "parallel.save_logits=true",
            f"quantization={quant}",
            f"hydra.run.dir={out}",
        )
        runs[quant] = (p, out)
    assert tree_digest(path) == before  # loading never writes into the checkpoint
    return path, runs


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_each_rank_reads_only_its_plan(tp_runs, quant):
    path, runs = tp_runs
    p, out = runs[quant]
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    plan_doc = json.loads((out / "plan.json").read_text())
    assert report["status"] == "ok" and all(report["validation"]["checks"].values())
    ranks = report["parallel"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and report["parallel"]["backend"] == "gloo"
    ck_bytes = report["checkpoint"]["bytes"]
    for r in ranks:
        assert r["bytes_read"] == r["read_bytes"] < ck_bytes  # its slices, never the whole checkpoint
        assert r["measured_bytes"] == r["predicted_bytes"] and r["plan_error"] == 0.0
        assert r["read_bytes"] == plan_doc["parallel"]["ranks"][r["rank"]]["read_bytes"]
    # the sharded tensors are read once over both ranks, the whole ones by each rank
    assert sum(r["bytes_read"] for r in ranks) == ck_bytes + _whole_bytes(path, plan_doc)
    # rank 1 writes nothing into the run directory but its log
    assert sorted(f.name for f in out.iterdir()) == [
        ".hydra",
        "logits.pt",
        "plan.json",
        "report.json",
        "run.log",
        "run.rank1.log",
    ]


def test_plan_shards_follow_the_models_own_plan(tp_runs):
    _path, runs = tp_runs
    plan_doc = json.loads((runs["none"][1] / "plan.json").read_text())
    r0, r1 = (r["tensors"] for r in plan_doc["parallel"]["ranks"])
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    assert r0[q]["shape"] == [32, 64] and r0[q]["slice"] == {"style": "colwise", "dim": 0, "start": 0, "stop": 32}
    assert r1[o]["shape"] == [64, 32] and r1[o]["slice"] == {"style": "rowwise", "dim": 1, "start": 32, "stop": 64}
    emb = "model.embed_tokens.weight"
    assert r1[emb]["slice"]["style"] == "embedding_rowwise" and r1[emb]["shape"] == [128, 64]
    assert r1["lm_head.weight"]["tied_to"] == emb and r1["lm_head.weight"]["slice"] == r1[emb]["slice"]
    assert "slice" not in r0["model.norm.weight"] and r0["model.norm.weight"]["shape"] == [64]


def test_fp32_logits_equal_the_single_process_load(tp_runs, tmp_path):
    path, runs = tp_runs
    p, out = runs["none"]
    assert p.stdout.count("run: ") == 1  # rank 0 prints the summary for all ranks
    assert "tensor parallel: 2 ranks (gloo)" in p.stdout and "logits vs single process: max |diff|" in p.stdout
    report = json.loads((out / "report.json").read_text())
    found = report["parallel"]["logits"]
    assert report["validation"]["checks"]["matches_single_process"] and found["matches"]
    sharded = torch.load(out / "logits.pt")
    single = _single_process_logits(path, "none", tmp_path / "single")
    assert sharded.shape == single.shape
    # rowwise layers sum their partial products in another order: fp32 rounding, not a different function
    assert (sharded - single).abs().max().item() <= 1e-5 * single.abs().max().item()


def test_int8_logits_match_the_single_process_int8_load(tp_runs, tmp_path):
    path, runs = tp_runs
    _p, out = runs["int8"]
    report = json.loads((out / "report.json").read_text())
    assert report["quantization"]["quantized"] == 21 and "matches_single_process" not in report["validation"]["checks"]
    sharded = torch.load(out / "logits.pt")
    single = _single_process_logits(path, "int8", tmp_path / "single8")
    fp32 = _single_process_logits(path, "none", tmp_path / "single32")
    own = quality.relative_error(single, fp32)  # the single-process int8 error
    # Each shard is quantized on its own (rowwise shards get their own row scales), so the two int8 models
    # differ by int8 noise: less than twice int8's own error, and as far from fp32 as the single-process one.
    assert quality.relative_error(sharded, single) < 2 * own
    assert quality.relative_error(sharded, fp32) < 1.5 * own
    assert report["parallel"]["logits"]["relative_error"] == pytest.approx(
        quality.relative_error(sharded, fp32), rel=1e-3
    )


def test_dry_run_plans_four_ranks_in_one_process(tmp_path):
    path = _four_heads_llama(tmp_path / "llama4")
    out = tmp_path / "run"
    p = run_cli(f"checkpoint.path={path}", "parallel=tensor", "parallel.world_size=4", DRY, f"hydra.run.dir={out}")
    assert p.returncode == 0, p.stderr
    printed = [ln.split() for ln in p.stderr.splitlines()]
    assert [row[:2] for row in printed if row[:1] in (["0"], ["1"], ["2"], ["3"])] == [
        ["0", "cpu"],
        ["1", "cpu"],
        ["2", "cpu"],
        ["3", "cpu"],
    ]
    doc = json.loads((out / "plan.json").read_text())["parallel"]
    assert doc["world_size"] == 4 and len(doc["ranks"]) == 4
    report = json.loads((out / "report.json").read_text())
    assert report["load"] is None and len(report["parallel"]["ranks"]) == 4
    ck = open_checkpoint(str(path))
    for name in ("model.layers.1.mlp.down_proj.weight", "lm_head.weight", "model.embed_tokens.weight"):
        parts = [r["tensors"][name] for r in doc["ranks"]]
        dim = parts[0]["slice"]["dim"]
        full = ck.tensors[name].shape
        assert [(t["slice"]["start"], t["slice"]["stop"]) for t in parts] == [
            (i * full[dim] // 4, (i + 1) * full[dim] // 4) for i in range(4)
        ]
        if name == "model.layers.1.mlp.down_proj.weight":  # int8 on each shard: a byte each, a scale per local row
            assert all(t["quantized"] == "int8" and t["bytes"] == 64 * 32 + 4 * 64 for t in parts)
        else:
            assert sum(t["bytes"] for t in parts) == math.prod(full) * 4  # fp32: the shards tile the tensor
    for r in doc["ranks"]:
        assert r["predicted_bytes"] == sum(t["bytes"] for t in r["tensors"].values())


def test_dry_run_plans_gpus_without_gpus(tmp_path):
    path = _four_heads_llama(tmp_path / "llama4")
    result = load(
        [
            f"checkpoint.path={path}",
            "parallel=tensor",
            "parallel.world_size=2",
            "parallel.device=cuda",
            "memory.max_memory={0: 1GiB, 1: 1GiB}",
            DRY,
        ],
        run_dir=tmp_path / "run",
    )
    ranks = result.report["parallel"]["ranks"]
    assert [r["device"] for r in ranks] == ["0", "1"] and result.report["parallel"]["backend"] == "nccl"
    assert result.report["plan"]["max_memory"] == {"0": 2**30}


BAD = [
    (["parallel.world_size=3", DRY], "parallel.world_size=3 does not divide model.embed_tokens.weight dim 0 (256)"),
    (["parallel.world_size=4", DRY], "does not divide the 2 key/value heads of LlamaForCausalLM"),
    (["parallel.world_size=2", "memory.max_memory={cpu: 1GiB, disk: 8GiB}", DRY], "memory.max_memory.disk: tensor"),
    (
        ["parallel.world_size=2", "parallel.device=cuda", "memory=gpu0_20gib", DRY],
        "memory.max_memory.cpu: tensor parallel does not offload",
    ),
    (["parallel.world_size=2", "device_map=sequential", DRY], "device_map=sequential: with parallel=tensor"),
    (["parallel.world_size=2", "quantization=nf4", DRY], "quantization=nf4 is not sharded yet"),
    (["parallel.world_size=2"], "parallel.world_size=2: this process was not started by torchrun"),
    (["parallel.world_size=0", DRY], "parallel.world_size: 0 must be at least 1"),
    (["parallel.backend=nccl", "parallel.device=cpu", DRY], "parallel.backend=nccl needs GPUs"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_input_is_refused_before_any_byte_is_read(overrides, message, tiny, tmp_path):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load([f"checkpoint.path={tiny('llama')}", "parallel=tensor", *overrides], run_dir=tmp_path / "run")
    report = info.value.result.report
    assert report["load"] is None and "load_shards" not in [s["name"] for s in report["stages"]]


def test_model_without_a_plan_is_named(tiny, tmp_path):
    with pytest.raises(UserError, match="GPT2LMHeadModel has no tensor-parallel plan"):
        load([f"checkpoint.path={tiny('gpt2')}", "parallel=tensor", "parallel.world_size=2", DRY], run_dir=tmp_path)


def test_cli_exit_2_with_one_line(tiny, tmp_path):
    p = run_cli(
        f"checkpoint.path={tiny('llama')}", "parallel=tensor", "parallel.world_size=2", f"hydra.run.dir={tmp_path}"
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: parallel.world_size=2: this process was not started")
    p = run_cli(
        f"checkpoint.path={tiny('llama')}", "parallel=tensor", "parallel.world_size=3", DRY, f"hydra.run.dir={tmp_path}"
    )
    assert p.returncode == 2 and "does not divide model.embed_tokens.weight dim 0" in p.stderr.strip().splitlines()[-1]


def _tiny(arch: str, dest: Path) -> Path:
    """Qwen2 (colwise q/k/v biases) and Phi-3 (fused qkv and gate_up, gathered; rowwise_split_input)."""
    from transformers import Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls, config_cls = {"qwen2": (Qwen2ForCausalLM, Qwen2Config), "phi3": (Phi3ForCausalLM, Phi3Config)}[arch]
    shape = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    config = config_cls(**shape, num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    cls(config).eval().save_pretrained(dest, max_shard_size=60_000)
    return dest


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_other_plans_load_and_match(arch, tmp_path):
    path = _tiny(arch, tmp_path / arch)
    out = tmp_path / "run"
    p = _torchrun(
        "checkpoint=hf_dir", f"checkpoint.path={path}", "parallel=tensor", "quantization=none", f"hydra.run.dir={out}"
    )
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["validation"]["checks"]["matches_single_process"] and all(report["validation"]["checks"].values())
    tensors = json.loads((out / "plan.json").read_text())["parallel"]["ranks"][1]["tensors"]
    fused = "model.layers.0.self_attn.qkv_proj.weight" if arch == "phi3" else "model.layers.0.self_attn.q_proj.bias"
    assert tensors[fused]["slice"]["style"] == ("colwise_gather_output" if arch == "phi3" else "colwise")
    for r in report["parallel"]["ranks"]:
        assert r["bytes_read"] == r["read_bytes"] < report["checkpoint"]["bytes"]
        assert r["measured_bytes"] == r["predicted_bytes"]


def _read_once_over_ranks(path, ranks: list[dict]) -> int:
    """Every checkpoint byte read once over all ranks, plus the tensors each rank keeps whole (from the plan)."""
    ck = open_checkpoint(str(path))
    whole = {}
    for name, t in ranks[0]["tensors"].items():
        if "slice" not in t and not t.get("tied_to"):
            for key in t.get("conversion", {}).get("sources") or [t.get("source", name)]:
                if key in ck.tensors:
                    whole[key] = ck.tensors[key].nbytes
    world = len(ranks)
    return sum(i.nbytes for i in ck.tensors.values()) + (world - 1) * sum(whole.values())


# transformers 5.24's Mixtral plan sharded the fused experts (packed_colwise gate_up, rowwise down);
# 5.25 moved experts to expert parallel and no released class plans packed styles any more. A plan
# in config.json (`base_model_tp_plan`) still selects them, so the packed slicing is tested that way.
PACKED_EXPERTS_PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
    "layers.*.mlp.experts.down_proj": "rowwise",
    "layers.*.mlp.experts": "moe_tp_experts",
}


def _with_packed_experts_plan(path: Path, dest: Path) -> Path:
    """A copy of a Mixtral checkpoint whose config.json names the packed experts plan."""
    shutil.copytree(path, dest)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "base_model_tp_plan": PACKED_EXPERTS_PLAN}))
    return dest


# every family of tests/architectures.py whose transformers class carries a tensor-parallel plan:
# MoE models (since transformers 5.25 their experts are whole on every rank; "mixtral+packed" is
# the plan 5.24 shipped: packed_colwise gate_up assembled from per-expert w1/w3, rowwise down from
# w2, moe_tp_experts), Qwen3's per-head norms (replicated_with_grad_allreduce), Gemma 2, GPT-NeoX
TP_FAMILIES = ["mixtral", "mixtral+packed", "qwen2_moe", "olmoe", "qwen3", "gemma2", "gpt_neox"]


@pytest.mark.parametrize("family", TP_FAMILIES)
def test_families_load_sharded_with_logits_of_the_single_process_load(family, saved, tmp_path):
    path = saved(family.split("+")[0])
    if family.endswith("+packed"):
        path = _with_packed_experts_plan(path, tmp_path / "packed")
    before = tree_digest(path)
    out = tmp_path / "run"
    p = _torchrun(
        "checkpoint=hf_dir",
        f"checkpoint.path={path}",
        "parallel=tensor",
        "parallel.save_logits=true",
        "quantization=none",
        f"hydra.run.dir={out}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert tree_digest(path) == before
    report = json.loads((out / "report.json").read_text())
    plan_ranks = json.loads((out / "plan.json").read_text())["parallel"]["ranks"]
    assert report["validation"]["checks"]["matches_single_process"] and all(report["validation"]["checks"].values())
    for r in report["parallel"]["ranks"]:
        assert r["bytes_read"] == r["read_bytes"] < report["checkpoint"]["bytes"]  # its slices only
        assert r["measured_bytes"] == r["predicted_bytes"] and r["plan_error"] == 0.0
    assert sum(r["bytes_read"] for r in report["parallel"]["ranks"]) == _read_once_over_ranks(path, plan_ranks)
    sharded = torch.load(out / "logits.pt")
    single = _single_process_logits(path, "none", tmp_path / "single")
    assert (sharded - single).abs().max().item() <= 1e-5 * single.abs().max().item()


def test_fused_experts_are_planned_packed_per_rank(saved, tmp_path):
    """Mixtral's gate_up_proj: each rank holds its half of gate and of up, read from every expert's w1 and w3."""
    path = _with_packed_experts_plan(saved("mixtral"), tmp_path / "mixtral")
    load([f"checkpoint.path={path}", "parallel=tensor", "parallel.world_size=2", DRY], run_dir=tmp_path / "run")
    ranks = json.loads((tmp_path / "run" / "plan.json").read_text())["parallel"]["ranks"]
    gu, down = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"
    full = open_checkpoint(str(path)).tensors["model.layers.0.block_sparse_moe.experts.0.w1.weight"].shape
    inter = full[0]
    for r in ranks:
        t = r["tensors"]
        assert t[gu]["slice"] == {
            "style": "packed_colwise",
            "dim": 1,
            "start": r["rank"] * inter // 2,
            "stop": (r["rank"] + 1) * inter // 2,
            "packed": 2,
        }
        assert t[gu]["shape"][1] == inter and t[down]["slice"]["dim"] == 2 and t[down]["shape"][2] == inter // 2


def test_a_world_size_that_cuts_the_packed_blocks_is_refused(tmp_path):
    """intermediate 33: gate_up's 66 rows split in two, but its gate and up blocks of 33 do not."""
    from architectures import BY_FAMILY, Arch, build

    mixtral = BY_FAMILY["mixtral"]
    odd = Arch(mixtral.family, mixtral.config, mixtral.model, dict(mixtral.kwargs, intermediate_size=33))
    path = _with_packed_experts_plan(build(odd, tmp_path / "mixtral"), tmp_path / "packed")
    with pytest.raises(UserError, match=r"does not divide .*in 2 packed blocks") as info:
        load([f"checkpoint.path={path}", "parallel=tensor", "parallel.world_size=2", DRY], run_dir=tmp_path / "run")
    assert info.value.result.report["load"] is None
