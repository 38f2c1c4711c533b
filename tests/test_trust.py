"""Issue 28: validate catches what a wrong load looks like, and every bad value is exit 2 before a byte is read.

Real files throughout: a safetensors header that says I32 for a norm weight, NaN planted in
checkpoint bytes (an embedding row the fixed inputs never touch, an int8 layer's SCB, 4-bit absmax),
config.json values transformers refuses, and bad stage values, through the CLI and pipeline.load.
"""

import dataclasses
import json
import shutil

import pytest
import torch
from helpers import rewrite_header, run_cli, save_bnb_quantized, tree_digest
from safetensors.torch import load_file, save_file

from pipeline import load
from pipeline.api import compose_config
from pipeline.engine.runner import bind_stages, start_context
from pipeline.errors import CheckFailed, UserError

NORM = "model.layers.0.input_layernorm.weight"
NO_METRICS = "stages.validate.metrics={perplexity: false, reference: false, greedy: false, throughput: false}"
BEFORE_BYTES = {"instantiate_empty", "plan"}  # stages that read headers only


def _copy(src, tmp_path):
    dest = tmp_path / "ck"
    shutil.copytree(src, dest)
    return dest


def _shard_of(ck, name):
    return ck / json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"][name]


def _plant_nan(ck, name, index):
    shard = _shard_of(ck, name)
    tensors = load_file(shard)
    tensors[name][index] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})


def _exit_2_before_bytes(p, run, culprit):
    """One `error:` line naming the culprit, no traceback, and no stage past the headers ran."""
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2, p.stderr[-2000:]
    assert last.startswith("error: ") and culprit in last and "Traceback" not in p.stderr, last
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "error" and report["load"] is None
    assert {s["name"] for s in report["stages"]} <= BEFORE_BYTES
    return last


def test_int32_norm_header_is_refused_at_plan(tiny, tmp_path):
    ck = _copy(tiny("llama"), tmp_path)
    shard = _shard_of(ck, NORM)
    rewrite_header(shard, lambda h: h[NORM].update(dtype="I32"))
    before = tree_digest(ck)
    p = run_cli(f"checkpoint.path={ck}", f"hydra.run.dir={tmp_path / 'run'}")
    last = _exit_2_before_bytes(p, tmp_path / "run", NORM)
    assert shard.name in last and "int32" in last and "floating point" in last
    assert json.loads((tmp_path / "run" / "report.json").read_text())["stages"][-1]["name"] == "plan"
    assert tree_digest(ck) == before


def test_an_int32_tensor_that_got_loaded_fails_validate(tiny, tmp_path):
    """Second line of defence: a plan that let an I32 norm through (as before issue 28) and the load that followed."""
    cfg = compose_config([f"checkpoint.path={tiny('llama')}", "quantization=none", NO_METRICS])
    stages = bind_stages(cfg)
    ctx = start_context(cfg, tmp_path)
    for _, stage in stages[:-1]:
        stage(ctx)
    module = ctx.model.model.layers[0].input_layernorm
    module.weight = torch.nn.Parameter(module.weight.data.to(torch.int32), requires_grad=False)
    ctx.plan.tensors[NORM] = dataclasses.replace(ctx.plan.tensors[NORM], dtype=torch.int32)
    with pytest.raises(CheckFailed, match="dtypes_as_planned"):
        stages[-1][1](ctx)
    why = ctx.report["validation"]["failures"]["dtypes_as_planned"]
    assert f"{NORM} (torch.int32)" in why and "floating point" in why


def _untied_llama(dest, vocab_size: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=128,
    )  # fmt: skip
    LlamaForCausalLM(config).eval().save_pretrained(dest, max_shard_size=60_000)
    return dest


@pytest.mark.parametrize("vocab", [256, 8192])  # 64 KiB and 2 MiB embeddings: under and over a sample's 1 MiB
def test_nan_in_an_embedding_row_no_input_touches_fails_by_default(tmp_path, vocab):
    ck = _untied_llama(tmp_path / "ck", vocab)
    _plant_nan(ck, "model.embed_tokens.weight", (vocab - 1, 7))  # in a block a 1-in-8 sample would skip
    with pytest.raises(CheckFailed, match="weights_finite") as exc:
        load([f"checkpoint.path={ck}", "quantization=none"], run_dir=tmp_path / "run")
    v = exc.value.result.report["validation"]
    assert v["checks"]["forward_finite"] is True  # the fixed inputs never read row 255
    assert v["failures"]["weights_finite"] == "NaN/Inf in: model.embed_tokens.weight"
    assert v["weights_finite"]["elements"] == v["weights_finite"]["of"] > 0  # every element, by default


@pytest.mark.parametrize(
    "kind, stat",
    [("int8", "SCB"), ("nf4-single", "weight.absmax"), ("nf4", "weight.nested_absmax")],
)
def test_nan_in_quantization_state_fails_the_scan(kind, stat, tiny, tmp_path):
    ck = save_bnb_quantized(tiny("llama"), tmp_path / "ck", kind)
    layer = "model.layers.1.mlp.down_proj"
    key = f"{layer}.{stat}"
    shard = next(p for p in ck.glob("*.safetensors") if key in load_file(p))
    tensors = load_file(shard)
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckFailed) as exc:
        load(
            [f"checkpoint.path={ck}", "quantization=none", NO_METRICS, "stages.validate.checks.forward_finite=false"],
            run_dir=tmp_path / "r",
        )
    v = exc.value.result.report["validation"]
    assert v["checks"]["weights_finite"] is False
    assert v["failures"]["weights_finite"] == f"NaN/Inf in: {layer}.{stat}"


def test_weights_finite_sample_is_in_the_report(tiny, tmp_path):
    result = load(
        [f"checkpoint.path={tiny('llama')}", NO_METRICS, "stages.validate.weights_finite_sample=4"], run_dir=tmp_path
    )
    scan = result.report["validation"]["weights_finite"]
    assert scan["sample"].startswith("1 in 4 blocks of 4096")
    assert 0 < scan["elements"] <= scan["of"] and scan["seconds"] >= 0


def _config_json(mutate):
    def corrupt(ck):
        doc = json.loads((ck / "config.json").read_text())
        doc = mutate(doc)
        (ck / "config.json").write_text(json.dumps(doc))

    return corrupt


CONFIG_CASES = {
    "hidden_size_string": (_config_json(lambda d: {**d, "hidden_size": "64"}), "config.json: hidden_size"),
    "hidden_size_63": (_config_json(lambda d: {**d, "hidden_size": 63}), "config.json: hidden_size"),
    "zero_heads": (_config_json(lambda d: {**d, "num_attention_heads": 0}), "config.json: num_attention_heads"),
    "json_list": (_config_json(lambda d: [d]), "config.json: a JSON list"),
    "unknown_activation": (_config_json(lambda d: {**d, "hidden_act": "nope"}), "config.json: hidden_act"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_json_value_is_exit_2_before_bytes(case, tiny, tmp_path):
    corrupt, culprit = CONFIG_CASES[case]
    ck = _copy(tiny("llama"), tmp_path)
    corrupt(ck)
    p = run_cli(f"checkpoint.path={ck}", f"hydra.run.dir={tmp_path / 'run'}")
    _exit_2_before_bytes(p, tmp_path / "run", culprit)


@pytest.mark.parametrize("cap", ["inf", "1e999"])  # infinite (negative, nan and unparseable caps were exit 2 already)
def test_bad_memory_cap_is_exit_2_at_plan(cap, tiny, tmp_path):
    p = run_cli(
        f"checkpoint.path={tiny('llama')}", "memory=cpu_4gib", f"memory.max_memory.cpu={cap}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    _exit_2_before_bytes(p, tmp_path / "run", "memory.max_memory.cpu")


BIND_CASES = [
    ("stages.validate.max_eval_tokens=abc", "stages.validate.max_eval_tokens: 'abc' is not an integer"),
    ("stages.validate.checks=yes", "stages.validate.checks: 'yes' is not a mapping"),
    ("stages.validate.checks.weights_finite=maybe", "stages.validate.checks.weights_finite: 'maybe' is not true"),
    ("stages.validate.max_new_tokens=-3", "stages.validate.max_new_tokens: -3 is not a count"),
    ("stages.validate.plan_tolerance=nan", "stages.validate.plan_tolerance: nan is not a count"),
    ("stages.load_shards.readahead=yes", "stages.load_shards.readahead: 'yes' is not true or false"),
    ("stages.load_shards.threads=1.5", "stages.load_shards.threads: 1.5 is not an integer or null"),
    ("checkpoint.model=transformers.LlamaForCausalLM", "checkpoint.model: 'transformers.LlamaForCausalLM' is not"),
    ("quantization.skip_modules=5", "quantization.skip_modules: 5 is not a list of module names"),
    ("quantization.skip_modules=[lm_head,3]", "quantization.skip_modules: ['lm_head', 3] is not a list"),
]


@pytest.mark.parametrize("override, message", BIND_CASES, ids=[o for o, _ in BIND_CASES])
def test_bad_stage_value_is_exit_2_before_any_stage(override, message, tiny, tmp_path):
    with pytest.raises(UserError) as exc:
        load([f"checkpoint.path={tiny('llama')}", "quantization=int8", override], run_dir=tmp_path)
    text = str(exc.value)
    assert text.startswith(message) and "\n" not in text, text
    assert exc.value.result.report["stages"] == []  # refused when the stages were bound


def test_bad_stage_value_through_the_cli(tiny, tmp_path):
    p = run_cli(f"checkpoint.path={tiny('llama')}", "stages.validate.max_eval_tokens=abc", f"hydra.run.dir={tmp_path}")
    last = _exit_2_before_bytes(p, tmp_path, "stages.validate.max_eval_tokens")
    assert json.loads((tmp_path / "report.json").read_text())["stages"] == []
    assert "set stages.validate.max_eval_tokens to an integer" in last


def test_a_sample_reads_every_nth_block_of_large_tensors():
    from pipeline.measure.checks import _finite

    x = torch.zeros(4096 * 160)  # 2.5 MiB: sampled; blocks 0, 8, 16, ... are read
    assert _finite(x, 8) == (4096 * 20, True)
    x[8 * 4096 + 5] = float("inf")
    assert _finite(x, 8) == (4096 * 20, False)
    x[8 * 4096 + 5], x[4096] = 0.0, float("nan")  # block 1: not in the sample, found by a full read
    assert _finite(x, 8)[1] and not _finite(x, 1)[1]
