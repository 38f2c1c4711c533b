"""Which class a checkpoint is built as: remote code only when trusted, unknown classes refused, no architectures.

Real directories: a tiny Llama saved by save_pretrained, with config.json edited the way
community checkpoints ship it (auto_map + a modeling file in the directory).
"""

import hashlib
import json
import shutil

import pytest
import torch
from helpers import run_cli, tree_digest
from transformers import AutoModelForCausalLM, LlamaForCausalLM, LlamaModel

from pipeline import load
from pipeline.errors import UserError

AUTO_MAP_ENTRY = "modeling_mine.MineForCausalLM"


def _edit_config(ck, **changes):
    cfg = json.loads((ck / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (ck / "config.json").write_text(json.dumps(cfg, indent=2))


@pytest.fixture
def remote_ck(tiny, tmp_path):
    """A Llama checkpoint whose config.json names a class only its own modeling file defines.

    Importing that file writes a marker file: the marker proves whether it ran.
    """
    # transformers copies the module under HF_MODULES_CACHE by directory name: one name per test directory
    ck = tmp_path / f"mine_{hashlib.sha1(str(tmp_path).encode()).hexdigest()[:10]}"
    shutil.copytree(tiny("llama"), ck)
    marker = tmp_path / "imported.marker"
    (ck / "modeling_mine.py").write_text(
        "import pathlib\n"
        "from transformers import LlamaForCausalLM\n\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n\n\n"
        "class MineForCausalLM(LlamaForCausalLM):\n"
        "    made_by_checkpoint_code = True\n"
    )
    _edit_config(ck, architectures=["MineForCausalLM"], auto_map={"AutoModelForCausalLM": AUTO_MAP_ENTRY})
    return ck, marker


def test_remote_code_is_refused_without_opt_in_and_nothing_runs(remote_ck, tmp_path):
    ck, marker = remote_ck
    before = tree_digest(ck)
    with pytest.raises(UserError) as err:
        load([f"checkpoint.path={ck}", "quantization=none"], run_dir=tmp_path / "run")
    msg = str(err.value)
    assert "MineForCausalLM" in msg and f"AutoModelForCausalLM: {AUTO_MAP_ENTRY}" in msg
    assert "checkpoint.trust_remote_code=true" in msg
    stages = err.value.result.report["stages"]
    assert [(s["name"], s["status"]) for s in stages] == [("instantiate_empty", "error")]  # before anything is built
    assert not marker.exists()  # the checkpoint's code never ran
    assert tree_digest(ck) == before


def test_remote_code_cli_exit_2(remote_ck, tmp_path):
    ck, marker = remote_ck
    p = run_cli(f"checkpoint.path={ck}", "quantization=none", f"hydra.run.dir={tmp_path / 'run'}")
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2, p.stderr[-2000:]
    assert last.startswith("error: ") and AUTO_MAP_ENTRY in last and "checkpoint.trust_remote_code=true" in last
    assert "Traceback" not in p.stderr
    assert not marker.exists()


def test_remote_code_is_used_when_trusted(remote_ck, tmp_path):
    ck, marker = remote_ck
    before = tree_digest(ck)
    result = load(
        [f"checkpoint.path={ck}", "quantization=none", "checkpoint.trust_remote_code=true"], run_dir=tmp_path / "run"
    )
    assert result.report["status"] == "ok", result.report["error"]
    assert marker.read_text() == "imported"
    model = result.model
    assert type(model).__name__ == "MineForCausalLM" and model.made_by_checkpoint_code
    assert result.report["model"]["class"] == "MineForCausalLM"
    module = result.report["model"]["class_module"]
    assert module.startswith("transformers_modules.") and module.endswith("modeling_mine")
    ref = AutoModelForCausalLM.from_pretrained(ck, trust_remote_code=True, local_files_only=True).eval()
    assert type(ref).__name__ == "MineForCausalLM"
    ids = torch.arange(16).unsqueeze(0)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert tree_digest(ck) == before


def test_transformers_class_wins_over_auto_map_unless_trusted(tiny, tmp_path):
    """architectures names a transformers class and auto_map offers the checkpoint's own: transformers' one,
    as from_pretrained without trust_remote_code; the checkpoint's file is not imported."""
    ck = tmp_path / "both"
    shutil.copytree(tiny("llama"), ck)
    marker = tmp_path / "marker"
    (ck / "modeling_llama_own.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n"
        "from transformers import LlamaForCausalLM as _L\n\n\nclass LlamaForCausalLM(_L):\n    pass\n"
    )
    _edit_config(ck, auto_map={"AutoModelForCausalLM": "modeling_llama_own.LlamaForCausalLM"})
    result = load([f"checkpoint.path={ck}", "quantization=none"], run_dir=tmp_path / "run")
    assert result.report["status"] == "ok"
    assert type(result.model) is LlamaForCausalLM and not marker.exists()


def test_unknown_architecture_is_exit_2_naming_it(tiny, tmp_path):
    ck = tmp_path / "unknown"
    shutil.copytree(tiny("llama"), ck)
    _edit_config(ck, architectures=["NoSuchModelForCausalLM"])
    with pytest.raises(UserError, match="NoSuchModelForCausalLM") as err:
        load([f"checkpoint.path={ck}", "quantization=none"], run_dir=tmp_path / "run")
    assert "no such class in transformers" in str(err.value) and "checkpoint.model" in str(err.value)
    p = run_cli(f"checkpoint.path={ck}", f"hydra.run.dir={tmp_path / 'run2'}")
    assert p.returncode == 2 and "NoSuchModelForCausalLM" in p.stderr.strip().splitlines()[-1]


def test_remote_config_class_is_refused_without_opt_in(tiny, tmp_path):
    ck = tmp_path / "cfg"
    shutil.copytree(tiny("llama"), ck)
    marker = tmp_path / "marker"
    (ck / "configuration_mine.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n")
    _edit_config(ck, model_type="mine_llama", auto_map={"AutoConfig": "configuration_mine.MineConfig"})
    with pytest.raises(UserError, match=r"auto_map AutoConfig: configuration_mine.MineConfig.*trust_remote_code=true"):
        load([f"checkpoint.path={ck}", "quantization=none"], run_dir=tmp_path / "run")
    assert not marker.exists()


def test_no_architectures_builds_the_head_from_pretrained_users_expect(tiny, tmp_path):
    ck = tmp_path / "noarch"
    shutil.copytree(tiny("llama"), ck)
    _edit_config(ck, architectures=None)
    result = load([f"checkpoint.path={ck}", "quantization=none"], run_dir=tmp_path / "run")
    assert result.report["status"] == "ok", result.report["error"]
    assert type(result.model) is LlamaForCausalLM


def test_no_architectures_base_model_checkpoint_builds_the_base_model(tiny, tmp_path):
    """Saved from LlamaModel (no `model.` prefix on its tensor names): the base model, every tensor used."""
    ck = tmp_path / "base"
    config = LlamaForCausalLM.config_class.from_pretrained(tiny("llama"))
    torch.manual_seed(0)
    LlamaModel(config).save_pretrained(ck)
    _edit_config(ck, architectures=None)
    result = load([f"checkpoint.path={ck}", "quantization=none"], run_dir=tmp_path / "run")
    assert result.report["status"] == "ok", result.report["error"]
    assert type(result.model) is LlamaModel


def test_no_architectures_with_an_unknown_head_is_exit_2(tmp_path):
    """Tensors under `vit.` come from a head class config.json does not name: exit 2 at once, not exit 1 later."""
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=16)
    model = ViTForImageClassification(config)
    config.save_pretrained(tmp_path / "ck")  # writes no architectures
    save_file({n: t.contiguous() for n, t in model.state_dict().items()}, tmp_path / "ck" / "model.safetensors")
    with pytest.raises(UserError, match=r"no architectures, and the tensor names \(vit\.\*\) come from a model"):
        load([f"checkpoint.path={tmp_path / 'ck'}", "quantization=none"], run_dir=tmp_path / "run")


def test_trusted_code_that_fails_to_build_is_exit_2(tiny, tmp_path):
    ck = tmp_path / f"broken_{hashlib.sha1(str(tmp_path).encode()).hexdigest()[:10]}"
    shutil.copytree(tiny("llama"), ck)
    (ck / "modeling_broken.py").write_text(
        "from transformers import LlamaForCausalLM\n\n\n"
        "class BrokenForCausalLM(LlamaForCausalLM):\n"
        "    def __init__(self, config):\n"
        "        raise KeyError('rope_flavour')\n"
    )
    _edit_config(
        ck, architectures=["BrokenForCausalLM"], auto_map={"AutoModelForCausalLM": "modeling_broken.BrokenForCausalLM"}
    )
    with pytest.raises(UserError, match=r"BrokenForCausalLM failed to build \(KeyError: 'rope_flavour'\)"):
        load(
            [f"checkpoint.path={ck}", "quantization=none", "checkpoint.trust_remote_code=true"],
            run_dir=tmp_path / "run",
        )


def test_auto_map_under_another_name_than_architectures(remote_ck, tmp_path):
    """architectures says MineModel, auto_map only has MineForCausalLM: still the checkpoint's code, still opt-in."""
    ck, marker = remote_ck
    _edit_config(ck, architectures=["MineModel"])
    with pytest.raises(UserError, match=rf"MineModel; auto_map AutoModelForCausalLM: {AUTO_MAP_ENTRY} .*=true"):
        load([f"checkpoint.path={ck}", "quantization=none"], run_dir=tmp_path / "run")
    assert not marker.exists()
    result = load(
        [f"checkpoint.path={ck}", "quantization=none", "checkpoint.trust_remote_code=true"], run_dir=tmp_path / "run2"
    )
    assert type(result.model).__name__ == "MineForCausalLM" and marker.exists()
