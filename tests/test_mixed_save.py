"""Saving a mixed plan (issue 32): int8 and nf4 modules side by side, written as bitsandbytes serialises each,
described by our own quantization_config, read back by the pipeline bit for bit and refused by transformers."""

import json
import shutil

import pytest
import torch
from helpers import assert_same_tensors, bnb_reference, run_cli, tree_digest
from safetensors import safe_open

from pipeline import load
from pipeline.errors import UserError
from pipeline.quant.bnb import import_bitsandbytes

SAVE = "stages=[instantiate_empty,plan,quantize,load_shards,validate,save]"
MIXED = ["quantization=int8", "quantization.methods={mlp: nf4, o_proj: keep}", "quantization.compute_dtype=fp32"]
IDS = torch.arange(16).unsqueeze(0)
LAYERS = range(3)
INT8 = [f"model.layers.{i}.self_attn.{p}" for i in LAYERS for p in ("q_proj", "k_proj", "v_proj")]
NF4 = [f"model.layers.{i}.mlp.{p}" for i in LAYERS for p in ("gate_proj", "up_proj", "down_proj")]


@pytest.fixture(scope="module")
def mixed(tiny, tmp_path_factory):
    """A tiny Llama loaded with int8 attention, nf4 MLPs, kept o_proj (one with its own threshold) and saved."""
    src = tiny("llama")
    before = tree_digest(src)
    base = tmp_path_factory.mktemp("mixed")
    dest = base / "saved"
    first = load(
        [f"checkpoint.path={src}", *MIXED, "quantization.overrides={k_proj: 2.0}", SAVE, f"stages.save.path={dest}"],
        run_dir=base / "run",
    )
    assert first.report["status"] == "ok" and tree_digest(src) == before  # the source is never written
    with torch.inference_mode():
        logits = first.model(IDS).logits  # Linear4bit casts its bias at the first forward: compare after one
    return first, dest, logits


def _kinds(model) -> dict[str, str]:
    bnb = import_bitsandbytes()
    kinds = {bnb.nn.Linear8bitLt: "int8", bnb.nn.Linear4bit: "4bit"}
    return {n: kinds[type(m)] for n, m in model.named_modules() if type(m) in kinds}


def _saved_tensors(dest) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(dest.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return out


def _copy(dest, tmp_path, mutate):
    """A copy of the mixed save whose config.json quantization_config `mutate` changed."""
    copy = tmp_path / "copy"
    shutil.copytree(dest, copy)
    config = json.loads((copy / "config.json").read_text())
    mutate(config["quantization_config"])
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_the_config_describes_the_mix_and_the_tensors_are_bitsandbytes_own(mixed):
    first, dest, _ = mixed
    qc = json.loads((dest / "config.json").read_text())["quantization_config"]
    assert qc == {
        "quant_method": "model_loader_mixed",
        "format_version": 1,
        "method": "int8",
        "methods": dict(sorted({**dict.fromkeys(INT8, "int8"), **dict.fromkeys(NF4, "nf4")}.items())),
        "int8": {"threshold": 6.0, "thresholds": {f"model.layers.{i}.self_attn.k_proj": 2.0 for i in LAYERS}},
        "4bit": {"compute_dtype": "float32", "double_quant": True, "blocksize": 64},
        "skip_modules": ["lm_head", *(f"model.layers.{i}.self_attn.o_proj" for i in LAYERS)],
    }
    saved, ours = _saved_tensors(dest), first.model.state_dict()
    q, m = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"
    assert {k for k in saved if k.startswith(q + ".")} == {f"{q}.weight", f"{q}.SCB", f"{q}.weight_format"}
    stats = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")
    assert {k for k in saved if k.startswith(m + ".")} == {f"{m}.weight", *(f"{m}.weight.{s}" for s in stats)}
    assert saved[f"{q}.weight"].dtype == torch.int8 and saved[f"{m}.weight"].dtype == torch.uint8
    assert sorted(saved) == sorted(k for k in ours if k != "lm_head.weight")  # tied to the embedding: saved once
    for key, value in saved.items():  # every tensor as the loaded model's bitsandbytes modules serialise it
        assert value.dtype == ours[key].dtype and torch.equal(value, ours[key].cpu()), key


@pytest.mark.parametrize(
    "run",
    [["quantization=none"], [], ["quantization=nf4", "quantization.compute_dtype=fp32"]],
    ids=["none", "default-int8", "nf4-fp32"],
)
def test_a_mixed_save_reloads_bit_for_bit(run, mixed, tmp_path):
    """Any method the checkpoint holds (or none) loads it as saved: same modules, tensors, logits; plan exact."""
    first, dest, logits = mixed
    again = load([f"checkpoint.path={dest}", *run], run_dir=tmp_path / "r")
    r = again.report
    assert r["status"] == "ok" and all(r["validation"]["checks"].values())
    assert r["validation"]["plan_error"] == {"cpu": 0.0}
    assert r["validation"]["measured_bytes"] == r["plan"]["predicted_bytes"]
    assert r["quantization"]["prequantized"] is True
    assert r["quantization"]["methods"] == first.report["quantization"]["methods"]
    assert r["quantization"]["thresholds"] == first.report["quantization"]["thresholds"] != {}
    assert _kinds(again.model) == _kinds(first.model) == {**dict.fromkeys(INT8, "int8"), **dict.fromkeys(NF4, "4bit")}
    with torch.inference_mode():
        assert torch.equal(again.model(IDS).logits, logits)
    assert assert_same_tensors(again.model, first.model) > 0


def test_transformers_refuses_a_mixed_save(mixed):
    """transformers knows no model_loader_mixed: it skips quantization and then fails on the packed 4-bit weights'
    shapes, loudly, instead of loading int8 codes as floats."""
    from transformers.quantizers.auto import AutoHfQuantizer

    _, dest, _ = mixed
    qc = json.loads((dest / "config.json").read_text())["quantization_config"]
    assert AutoHfQuantizer.supports_quant_method(qc) is False
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        bnb_reference(dest)


@pytest.mark.parametrize(
    ("mutate", "key", "says"),
    [
        (lambda qc: qc.update(format_version=2), "format_version", "2 is not a version this loader reads (1)"),
        (lambda qc: qc.update(format_version="1"), "format_version", "'1' is not a version this loader reads"),
        (
            lambda qc: qc["methods"].update({"model.layers.0.mlp.up_proj": "int4"}),
            "methods.model.layers.0.mlp.up_proj",
            "'int4' is not a method this loader reads (int8, nf4, fp4)",
        ),
        (
            lambda qc: qc["methods"].update({"model.layers.0.mlp.up_proj": "int8"}),
            "methods.model.layers.0.mlp.up_proj",
            "says int8 but the checkpoint has no model.layers.0.mlp.up_proj.SCB",
        ),
        (
            lambda qc: qc["methods"].pop("model.layers.2.self_attn.v_proj"),
            "methods",
            "model.layers.2.self_attn.v_proj.weight is saved quantized but not listed",
        ),
        (lambda qc: qc.update(method="auto"), "method", "'auto' is not one of int8, nf4, fp4"),
        (lambda qc: qc.pop("4bit"), "4bit", "None is not the 4bit settings"),
        (lambda qc: qc["int8"].update(threshold=-1), "int8.threshold", "-1 is not a threshold"),
    ],
    ids=["version", "version-text", "method", "wrong-kind", "unlisted", "base", "no-4bit", "threshold"],
)
def test_what_we_cannot_read_is_exit_2_naming_the_key(mutate, key, says, mixed, tmp_path):
    _, dest, _ = mixed
    copy = _copy(dest, tmp_path, mutate)
    with pytest.raises(UserError) as err:
        load(
            [f"checkpoint.path={copy}", "quantization=none", "stages=[instantiate_empty,plan]"], run_dir=tmp_path / "r"
        )
    message = str(err.value)
    assert message.startswith(f"{copy / 'config.json'} quantization_config.{key}: {says}"), message
    assert "\n" not in message


def test_an_unknown_format_version_is_exit_2_in_one_line_from_the_cli(mixed, tmp_path):
    _, dest, _ = mixed
    copy = _copy(dest, tmp_path, lambda qc: qc.update(format_version=2))
    p = run_cli(f"checkpoint.path={copy}", "quantization=none", f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if "quantization_config.format_version" in line]
    assert len(lines) == 1 and str(copy / "config.json") in lines[0] and "Traceback" not in p.stderr


def test_a_mixed_save_refuses_a_method_it_does_not_hold(mixed, tmp_path):
    _, dest, _ = mixed
    with pytest.raises(UserError, match=r"^quantization=fp4: the checkpoint is already int8/nf4 \("):
        load([f"checkpoint.path={dest}", "quantization=fp4"], run_dir=tmp_path / "r")


def test_one_method_plus_kept_modules_still_saves_what_transformers_reads(tiny, tmp_path):
    """Per-module methods that leave one method (here nf4 for every projection under quantization=int8, some
    kept) save transformers' own BitsAndBytesConfig, which from_pretrained loads to the same logits."""
    from transformers import BitsAndBytesConfig

    dest = tmp_path / "one"
    first = load(
        [
            f"checkpoint.path={tiny('llama')}",
            "quantization=int8",
            "quantization.methods={o_proj: keep, self_attn: nf4, mlp: nf4}",
            SAVE,
            f"stages.save.path={dest}",
        ],
        run_dir=tmp_path / "a",
    )
    skip = ["lm_head", *(f"model.layers.{i}.self_attn.o_proj" for i in LAYERS)]
    expected = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=skip,
    )
    assert json.loads((dest / "config.json").read_text())["quantization_config"] == json.loads(
        json.dumps(expected.to_dict())
    )
    theirs = bnb_reference(dest)
    with torch.inference_mode():
        assert torch.equal(first.model(IDS).logits, theirs(IDS).logits)
    assert assert_same_tensors(first.model, theirs) > 0


def test_a_mixed_save_keeps_the_save_rules(mixed, tiny, tmp_path):
    """Never into the source; an earlier save is replaced only with overwrite=true."""
    src, (_, dest, _) = tiny("llama"), mixed
    before = tree_digest(src)
    with pytest.raises(UserError, match="is inside the source checkpoint"):
        load([f"checkpoint.path={src}", *MIXED, SAVE, f"stages.save.path={src / 'mixed'}"], run_dir=tmp_path / "a")
    assert tree_digest(src) == before and not (src / "mixed").exists()
    again = tmp_path / "again"
    shutil.copytree(dest, again)
    with pytest.raises(UserError, match="set stages.save.overwrite=true"):
        load([f"checkpoint.path={src}", *MIXED, SAVE, f"stages.save.path={again}"], run_dir=tmp_path / "b")
    r = load(
        [f"checkpoint.path={src}", *MIXED, SAVE, f"stages.save.path={again}", "stages.save.overwrite=true"],
        run_dir=tmp_path / "c",
    )
    assert r.report["save"]["path"] == str(again.resolve()) and tree_digest(src) == before


def test_the_models_own_save_pretrained_writes_the_mixed_format(mixed, tmp_path):
    """`model.save_pretrained` on a mixed model (what users call, not our save stage): config.json says the mix,
    in the same format as the save stage writes, so the pipeline reads it back bit for bit and transformers
    refuses it loudly; before, it said int8 only and transformers loaded the nf4 MLPs as empty int8 layers."""
    first, dest, logits = mixed
    own = tmp_path / "own"
    first.model.save_pretrained(own)
    qc = json.loads((own / "config.json").read_text())["quantization_config"]
    ours = json.loads((dest / "config.json").read_text())["quantization_config"]
    assert qc == ours and qc["quant_method"] == "model_loader_mixed"
    again = load([f"checkpoint.path={own}", "quantization=int8"], run_dir=tmp_path / "r")
    assert again.report["status"] == "ok" and all(again.report["validation"]["checks"].values())
    assert again.report["quantization"]["methods"] == first.report["quantization"]["methods"]
    with torch.inference_mode():
        assert torch.equal(again.model(IDS).logits, logits)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        bnb_reference(own)


def test_one_method_models_still_say_transformers_config(tiny, tmp_path):
    """A single-method model keeps transformers' own BitsAndBytesConfig (only a mix gets ours)."""
    r = load([f"checkpoint.path={tiny('llama')}", "quantization=nf4", "quantization.methods={o_proj: keep}"],
             run_dir=tmp_path / "r")  # fmt: skip
    from transformers import BitsAndBytesConfig

    assert isinstance(r.model.config.quantization_config, BitsAndBytesConfig)
    assert r.model.config.quantization_config.load_in_4bit
