"""All five stages through the Python API on tiny checkpoints of real architectures."""

import json
import shutil

import pytest
import torch
from helpers import ARCHS, tree_digest, with_extra_tensor
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from pipeline import load
from pipeline.errors import CheckFailed, UserError
from pipeline.quant.bnb import import_bitsandbytes

STAGES = ["instantiate_empty", "plan", "quantize", "load_shards", "validate"]


def _reference(path, arch, dtype=None):
    cls = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=dtype or "auto").eval()


def _assert_ok(result):
    r = result.report
    assert r["status"] == "ok", r["error"]
    assert [s["name"] for s in r["stages"]] == STAGES
    assert all(s["status"] == "ok" for s in r["stages"])
    assert all(r["validation"]["checks"].values()), r["validation"]["failures"]
    assert r["validation"]["plan_error"] == {d: 0.0 for d in r["plan"]["predicted_bytes"]}


@pytest.mark.parametrize("arch", ARCHS)
def test_unquantized_load_equals_transformers(arch, tiny, tmp_path):
    path = tiny(arch)
    before = tree_digest(path)
    result = load([f"checkpoint.path={path}", "quantization=none"], run_dir=tmp_path / "run")
    _assert_ok(result)
    ref = _reference(path, arch).state_dict()
    ours = result.model.state_dict()
    assert set(ours) == set(ref)
    for name, tensor in ref.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    assert tree_digest(path) == before  # loading never writes into the checkpoint
    for f in ("report.json", "plan.json", "run.log", ".hydra/config.yaml", ".hydra/overrides.yaml"):
        assert (tmp_path / "run" / f).is_file(), f


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_load_matches_bitsandbytes(arch, tiny, tmp_path):
    bnb = import_bitsandbytes()
    path = tiny(arch)
    result = load(
        [f"checkpoint.path={path}", "quantization=int8", "quantization.threshold=4"], run_dir=tmp_path / "run"
    )
    _assert_ok(result)
    q = result.report["quantization"]
    assert q["method"] == "int8" and q["threshold"] == 4.0
    ref = _reference(path, arch).state_dict()
    modules = dict(result.model.named_modules())
    int8 = [n for n, m in modules.items() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(int8) == q["quantized"]
    assert q["quantized"] > 0  # GPT-2's Conv1D layers too, as transformers quantizes them
    for name in int8:
        w = modules[name].weight
        ref_w = ref[f"{name}.weight"]
        if modules[name].source_cls.__name__ == "Conv1D":  # stored (in, out); bitsandbytes holds (out, in)
            ref_w = ref_w.T
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(ref_w.to(torch.float16))
        w_scb = w.SCB if w.SCB is not None else modules[name].state.SCB  # moved there by the first forward
        assert w.dtype == torch.int8 and torch.equal(w.data, cb) and torch.equal(w_scb, scb), name
        assert modules[name].state.threshold == 4.0
    head = result.model.get_output_embeddings()
    assert not isinstance(head, bnb.nn.Linear8bitLt) and "lm_head" in q["skipped"]


def test_tied_weights_stay_tied_and_are_counted_once(tiny, tmp_path):
    result = load([f"checkpoint.path={tiny('llama')}", "quantization=none"], run_dir=tmp_path / "run")
    m = result.model
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert result.report["validation"]["checks"]["tied_weights_tied"]
    ck_bytes = result.report["checkpoint"]["bytes"]
    buffers = sum(b.numel() * b.element_size() for b in m.buffers())
    assert result.report["plan"]["predicted_bytes"]["cpu"] == ck_bytes + buffers


@pytest.mark.parametrize(
    "policy,expected", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]
)
def test_dtype_policy_casts_like_torch(policy, expected, tiny, tmp_path):
    path = tiny("llama")
    result = load([f"checkpoint.path={path}", "quantization=none", f"dtype={policy}"], run_dir=tmp_path / "run")
    _assert_ok(result)
    ref = _reference(path, "llama", torch.float32).state_dict()
    for name, p in result.model.named_parameters():
        assert p.dtype == expected and torch.equal(p, ref[name].to(expected)), name


def test_dtype_auto_keeps_checkpoint_dtype(tiny, tmp_path):
    result = load([f"checkpoint.path={tiny('llama', torch.bfloat16)}", "quantization=none"], run_dir=tmp_path / "run")
    _assert_ok(result)
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}
    assert result.model.model.rotary_emb.inv_freq.dtype == torch.float32  # skeleton buffers keep theirs


def test_dtype_override_by_pattern(tiny, tmp_path):
    load(
        [
            f"checkpoint.path={tiny('llama')}",
            "quantization=none",
            "dtype=bf16",
            "+experiment=dry_run",
            "dtype.overrides={norm: fp32, up_proj: fp16}",
        ],
        run_dir=tmp_path / "run",
    )
    tensors = json.loads((tmp_path / "run" / "plan.json").read_text())["tensors"]
    assert tensors["model.norm.weight"]["dtype"] == "float32"
    assert tensors["model.layers.0.input_layernorm.weight"]["dtype"] == "bfloat16"
    assert tensors["model.layers.2.mlp.up_proj.weight"]["dtype"] == "float16"
    assert tensors["model.layers.2.mlp.up_proj.weight"]["bytes"] == 64 * 128 * 2


def test_t5_keeps_wo_in_fp32_under_fp16(tiny, tmp_path):
    result = load([f"checkpoint.path={tiny('t5')}", "quantization=none", "dtype=fp16"], run_dir=tmp_path / "run")
    _assert_ok(result)
    assert result.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert result.model.encoder.block[0].layer[1].DenseReluDense.wi.weight.dtype == torch.float16


@pytest.mark.parametrize("strategy", ["auto", "balanced", "balanced_low_0", "sequential", "cpu"])
def test_strategies_on_a_cpu_machine(strategy, tiny, tmp_path):
    result = load(
        [f"checkpoint.path={tiny('bloom')}", f"device_map={strategy}", "memory=cpu_4gib"], run_dir=tmp_path / "run"
    )
    _assert_ok(result)
    assert set(result.report["plan"]["predicted_bytes"]) == {"cpu"}


def test_explicit_map(tiny, tmp_path):
    result = load(
        [f"checkpoint.path={tiny('llama')}", "device_map=explicit", "device_map.map={model: cpu, lm_head: cpu}"],
        run_dir=tmp_path / "run",
    )
    _assert_ok(result)
    assert result.report["plan"]["device_map"] == {"model": "cpu", "lm_head": "cpu"}


def test_explicit_map_must_name_real_modules(tiny, tmp_path):
    with pytest.raises(UserError, match="'decoder' is not a module of LlamaForCausalLM"):
        load(
            [f"checkpoint.path={tiny('llama')}", "device_map=explicit", "device_map.map={model: cpu, decoder: cpu}"],
            run_dir=tmp_path / "run",
        )


def test_dry_run_plans_gpus_that_do_not_exist(tiny, tmp_path):
    path = tiny("llama")
    overrides = [
        f"checkpoint.path={path}",
        "+experiment=dry_run",
        "device_map=sequential",
        "quantization=none",
        "memory.max_memory={0: 220KiB, 1: 220KiB, cpu: 1GiB}",
    ]
    result = load(overrides, run_dir=tmp_path / "a")
    r = result.report
    assert r["status"] == "ok" and [s["name"] for s in r["stages"]] == ["instantiate_empty", "plan"]
    predicted = r["plan"]["predicted_bytes"]
    assert set(predicted) == {"0", "1", "cpu"}
    assert predicted["0"] <= 220 * 1024 and predicted["1"] <= 220 * 1024
    assert r["plan"]["device_map"]["lm_head"] == r["plan"]["device_map"]["model.embed_tokens"]  # tied
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    assert sum(t["bytes"] for t in plan["tensors"].values()) == sum(predicted.values())
    assert r["load"] is None and r["validation"] is None
    load(overrides, run_dir=tmp_path / "b")  # same inputs, byte-identical plan
    assert (tmp_path / "a" / "plan.json").read_bytes() == (tmp_path / "b" / "plan.json").read_bytes()


def test_loading_onto_a_missing_gpu_is_a_user_error(tiny, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="puts weights on GPU 0 but this machine has 0 GPU"):
        load([f"checkpoint.path={tiny('llama')}", "memory.max_memory={0: 1GiB, cpu: 1GiB}"], run_dir=tmp_path / "run")


def test_caps_too_small_name_device_and_missing_bytes(tiny, tmp_path):
    with pytest.raises(UserError, match=r"memory\.max_memory\.cpu: \d+ bytes \(.*\) missing") as exc:
        load([f"checkpoint.path={tiny('llama')}", "memory.max_memory={cpu: 10KiB}"], run_dir=tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "error" and report["stages"][-1] == {
        **report["stages"][-1],
        "name": "plan",
        "status": "error",
    }
    assert exc.value.result.report == report


def _copy_without(src, dest, drop):
    """A copy of a sharded checkpoint with one tensor removed (the source is never touched)."""
    dest.mkdir()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            tensors.pop(drop, None)
            if tensors:
                save_file(tensors, dest / f.name, metadata={"format": "pt"})
            else:
                index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != f.name}
        else:
            (dest / f.name).write_bytes(f.read_bytes())
    index["weight_map"].pop(drop, None)
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest


def test_missing_weight_is_exit_2_at_plan_time_and_names_it(tiny, tmp_path):
    """Issue 29: a tensor the checkpoint lacks is refused before any byte is read (it used to load and fail
    validation); checkpoint.allow_missing=true loads it initialised and lists it, as transformers' missing_keys."""
    path = _copy_without(tiny("llama"), tmp_path / "ck", "model.layers.1.mlp.down_proj.weight")
    with pytest.raises(UserError, match="1 model tensors have no source: model.layers.1.mlp.down_proj.weight;"):
        load([f"checkpoint.path={path}", "quantization=none"], run_dir=tmp_path / "run")
    r = load([f"checkpoint.path={path}", "quantization=none", "checkpoint.allow_missing=true"], run_dir=tmp_path / "ok")
    report = r.report
    assert report["status"] == "ok"
    assert report["load"]["missing_keys"] == ["model.layers.1.mlp.down_proj.weight"]
    assert report["validation"]["checks"]["all_parameters_loaded"] is True
    assert report["validation"]["checks"]["no_meta_tensors"] is True


def test_unexpected_tensor_fails_validation(tiny, tmp_path):
    dest = with_extra_tensor(tiny("gpt2"), tmp_path / "ck")
    with pytest.raises(CheckFailed, match="unused checkpoint tensors: extra.weight"):
        load([f"checkpoint.path={dest}"], run_dir=tmp_path / "run")


def test_shape_mismatch_names_the_tensor(tiny, tmp_path):
    dest = tmp_path / "ck"
    shutil.copytree(tiny("llama"), dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (dest / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"tensor 'model.layers.0.mlp.(down|gate|up)_proj.weight' has shape"):
        load([f"checkpoint.path={dest}"], run_dir=tmp_path / "run")


def test_single_file_with_a_torch_model_target(tmp_path):
    lin = torch.nn.Linear(4, 3)
    save_file(lin.state_dict(), tmp_path / "lin.safetensors")
    result = load(
        [
            f"checkpoint.path={tmp_path / 'lin.safetensors'}",
            "quantization=none",
            "checkpoint.model={_target_: torch.nn.Linear, in_features: 4, out_features: 3}",
        ],
        run_dir=tmp_path / "run",
    )
    _assert_ok(result)
    assert torch.equal(result.model.weight, lin.weight) and torch.equal(result.model.bias, lin.bias)


def test_missing_stage_dependency_is_a_user_error(tiny, tmp_path):
    with pytest.raises(UserError, match="load_shards needs plan to run before it"):
        load([f"checkpoint.path={tiny('llama')}", "stages=[instantiate_empty,load_shards]"], run_dir=tmp_path / "run")
