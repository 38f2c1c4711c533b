"""No code runs that the user did not allow: not through a `_target_`, a pickle, a checkpoint's own
modeling, configuration or tokenizer code, a YAML tag, or transformers' "run the custom code? [y/N]".

Everything is real: pickles whose __reduce__ runs a command, modeling/configuration/tokenization
files in the checkpoint directory that write a marker file when imported, the CLI in a subprocess
with stdin answering "y" to any prompt. Each test asserts that the marker never appears, and that a
refusal is exit 2 with one line on stderr.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import REPO

from pipeline.engine.binding import locate
from pipeline.errors import UserError

YES = "y\n" * 200  # whatever transformers asks, the answer is yes


def cli(*args, stdin: str = YES, extra_path: str | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` with every prompt answered "y" (no PIPELINE_DEBUG, no HYDRA_FULL_ERROR)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PIPELINE_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, input=stdin, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def refused(p: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2 and exactly one line on stderr besides the run log ("error: ..."), naming every word; returns it."""
    lines = [ln for ln in p.stderr.strip().splitlines() if not ln.startswith(("[INFO]", "[WARNING]"))]
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil_pickle(tmp_path):
    marker = tmp_path / "unpickled.marker"
    path = tmp_path / "evil.pt"
    torch.save({"w": _Evil(marker)}, path)  # what torch.load(weights_only=False) would run
    return path, marker


def _unique_dir(tmp_path, stem: str):
    """transformers caches a checkpoint's code module by directory name: one name per test directory."""
    return tmp_path / f"{stem}_{hashlib.sha1(str(tmp_path).encode()).hexdigest()[:10]}"


def _marker_line(marker) -> str:
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n"


@pytest.fixture
def remote_ck(tiny, tmp_path):
    """A checkpoint whose model type, config and model class exist only in its own code (as many Hub
    repositories ship them); every one of its modules writes the marker when imported."""
    ck = _unique_dir(tmp_path, "remote")
    shutil.copytree(tiny("llama"), ck)
    marker = tmp_path / "code_ran.marker"
    (ck / "configuration_mine.py").write_text(
        _marker_line(marker) + "from transformers import LlamaConfig\n\n\n"
        "class MineConfig(LlamaConfig):\n    model_type = 'mine'\n"
    )
    (ck / "modeling_mine.py").write_text(
        _marker_line(marker) + "from transformers import LlamaForCausalLM\n\n"
        "from .configuration_mine import MineConfig\n\n\n"
        "class MineForCausalLM(LlamaForCausalLM):\n    config_class = MineConfig\n"
    )
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(
        model_type="mine",
        architectures=["MineForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_mine.MineConfig",
            "AutoModelForCausalLM": "modeling_mine.MineForCausalLM",
        },
    )
    (ck / "config.json").write_text(json.dumps(cfg))
    return ck, marker


@pytest.fixture
def remote_tokenizer_ck(tiny, tmp_path):
    """A transformers Llama (nothing of its own to run for the model) whose tokenizer is its own code."""
    ck = _unique_dir(tmp_path, "tok")
    shutil.copytree(tiny("llama"), ck)
    marker = tmp_path / "tokenizer_code_ran.marker"
    (ck / "tokenization_mine.py").write_text(
        _marker_line(marker) + "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class MineTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    (ck / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "MineTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_mine.MineTokenizer", None]},
            }
        )
    )
    return ck, marker


# --- targets are checked by the object they resolve to -------------------------------------------------


@pytest.mark.parametrize(
    "target, real",
    [
        ("torch.nn.modules.module.torch.load", "torch.serialization.load"),
        ("torch.nn.modules.module.torch.serialization.pickle.loads", "_pickle.loads"),
        ("torch.nn.parallel.distributed.os.system", "posix.system"),
    ],
)
def test_spelling_under_torch_nn_that_reaches_elsewhere_is_refused(target, real):
    with pytest.raises(UserError, match=f"resolves to {real}, not a torch.nn.Module class"):
        locate(target, "checkpoint.model")


def test_torch_load_through_torch_nn_never_unpickles(tiny, tmp_path, evil_pickle):
    path, marker = evil_pickle
    node = f"{{_target_: torch.nn.modules.module.torch.load, f: {path}, weights_only: false}}"
    p = cli(f"checkpoint.path={tiny('llama')}", f"checkpoint.model={node}", f"hydra.run.dir={tmp_path / 'run'}")
    refused(p, "checkpoint.model._target_", "torch.serialization.load")
    assert not marker.exists()


@pytest.mark.parametrize(
    "target, why",
    [
        ("pipeline.stages.plan._log_plan", "not a stage function"),
        ("pipeline.stages.save.torch.load", "not a stage function"),
        ("transformers.LlamaForCausalLM.from_pretrained", "from_pretrained of a model class"),
        ("transformers.AutoModelForCausalLM.from_pretrained", "from_pretrained of a model class"),
        ("torch.nn.Module.load_state_dict", "not a torch.nn.Module class"),
    ],
)
def test_builtin_prefixes_admit_only_their_own_kind(target, why):
    with pytest.raises(UserError, match=why):
        locate(target, "k")


def test_a_user_prefix_admits_only_what_is_defined_under_it_and_no_loader():
    with pytest.raises(
        UserError, match="resolves to torch.serialization.load, which is not under torch.nn.modules.module"
    ):
        locate("torch.nn.modules.module.torch.load", "k", ["torch.nn.modules.module.*"])
    with pytest.raises(UserError, match="a loader entry point"):
        locate("transformers.AutoModelForCausalLM.from_pretrained", "k", ["transformers.*"])
    assert locate(
        "transformers.AutoModelForCausalLM.from_pretrained", "k", ["transformers.AutoModelForCausalLM.from_pretrained"]
    )


def test_stage_target_elsewhere_is_exit_2(tiny, tmp_path):
    p = cli(
        f"checkpoint.path={tiny('llama')}",
        "stages.plan._target_=pipeline.stages.save.torch.load",
        f"hydra.run.dir={tmp_path / 'r'}",
    )
    refused(p, "stages.plan._target_", "torch.serialization.load")


# --- loaders and the checkpoint's own code ----------------------------------------------------------


def test_from_pretrained_target_is_refused_and_no_code_runs(remote_ck, tmp_path):
    ck, marker = remote_ck
    node = f"{{_target_: transformers.AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path: {ck}, trust_remote_code: true}}"
    p = cli(f"checkpoint.path={ck}", f"checkpoint.model={node}", f"hydra.run.dir={tmp_path / 'run'}")
    refused(p, "checkpoint.model._target_", "from_pretrained")
    assert not marker.exists()


def test_allow_listed_loader_cannot_override_trust_remote_code(remote_ck, tmp_path):
    ck, marker = remote_ck
    target = "transformers.AutoModelForCausalLM.from_pretrained"
    node = f"{{_target_: {target}, pretrained_model_name_or_path: {ck}, trust_remote_code: true}}"
    p = cli(
        f"checkpoint.path={ck}",
        f"checkpoint.model={node}",
        f"allow_targets=[{target}]",
        f"hydra.run.dir={tmp_path / 'r'}",
    )
    refused(p, "checkpoint.model.trust_remote_code", "checkpoint.trust_remote_code=true")
    assert not marker.exists()


def test_allow_listed_loader_is_told_trust_remote_code_and_never_prompts(remote_ck, tmp_path):
    ck, marker = remote_ck
    target = "transformers.AutoModelForCausalLM.from_pretrained"
    node = f"{{_target_: {target}, pretrained_model_name_or_path: {ck}}}"
    p = cli(
        f"checkpoint.path={ck}",
        f"checkpoint.model={node}",
        f"allow_targets=[{target}]",
        f"hydra.run.dir={tmp_path / 'r'}",
    )
    refused(p, "checkpoint.model")
    assert "[y/N]" not in p.stdout + p.stderr
    assert not marker.exists()


def test_allow_listed_torch_load_cannot_turn_weights_only_off(tiny, tmp_path, evil_pickle):
    path, marker = evil_pickle
    node = f"{{_target_: torch.load, f: {path}, weights_only: false}}"
    args = [f"checkpoint.path={tiny('llama')}", f"checkpoint.model={node}", "allow_targets=[torch.load]"]
    p = cli(*args, f"hydra.run.dir={tmp_path / 'r'}")
    refused(p, "checkpoint.model.weights_only", "checkpoint.allow_pickle=true")
    assert not marker.exists()


def test_stage_key_cannot_trust_what_checkpoint_key_does_not(remote_ck, tmp_path):
    ck, marker = remote_ck
    p = cli(
        f"checkpoint.path={ck}", "stages.instantiate_empty.trust_remote_code=true", f"hydra.run.dir={tmp_path / 'r'}"
    )
    refused(p, "stages.instantiate_empty.trust_remote_code", "checkpoint.trust_remote_code")
    assert not marker.exists()


@pytest.mark.parametrize("value", ["maybe", "2", "'yes please'"])
def test_trust_key_must_be_a_boolean(remote_ck, tmp_path, value):
    ck, marker = remote_ck
    p = cli(f"checkpoint.path={ck}", f"checkpoint.trust_remote_code={value}", f"hydra.run.dir={tmp_path / 'r'}")
    refused(p, "checkpoint.trust_remote_code", "is not true or false")
    assert not marker.exists()


def test_quoted_false_withholds_trust(remote_ck, tmp_path):
    """A string 'false' is truthy in Python; the typed contract reads it as false, so nothing is imported."""
    ck, marker = remote_ck
    p = cli(f"checkpoint.path={ck}", "checkpoint.trust_remote_code='false'", f"hydra.run.dir={tmp_path / 'r'}")
    refused(p, "nothing from the checkpoint is imported unless you trust it")
    assert not marker.exists()


def test_trusted_auto_class_target_builds_the_checkpoint_class_without_a_prompt(remote_ck, tmp_path):
    ck, marker = remote_ck
    args = [
        f"checkpoint.path={ck}",
        "checkpoint.trust_remote_code=true",
        "checkpoint.model={_target_: transformers.AutoModelForCausalLM}",
    ]
    p = cli(*args, "+experiment=dry_run", f"hydra.run.dir={tmp_path / 'r'}", stdin="n\n" * 200)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "r" / "report.json").read_text())["model"]["class"] == "MineForCausalLM"
    assert marker.exists()  # trusted: its code ran, and nobody was asked


# --- the tokenizer: never the checkpoint's code unless trusted -------------------------------------


def test_untrusted_tokenizer_code_never_runs_and_text_metrics_say_why(remote_tokenizer_ck, tmp_path):
    ck, marker = remote_tokenizer_ck
    p = cli(f"checkpoint.path={ck}", "quantization=none", f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert not marker.exists()
    skipped = json.loads((tmp_path / "r" / "report.json").read_text())["validation"]["skipped"]
    for metric in ("perplexity", "greedy"):
        assert "tokenizer_config.json" in skipped[metric] and "checkpoint.trust_remote_code=true" in skipped[metric]


def test_tokenizer_is_loaded_with_the_trust_key(remote_tokenizer_ck):
    from pipeline.measure.quality import load_tokenizer, tokenizer_code

    ck, marker = remote_tokenizer_ck
    assert "auto_map AutoTokenizer: tokenization_mine.MineTokenizer" in tokenizer_code(str(ck))
    with pytest.raises(ValueError):
        load_tokenizer(str(ck), trust_remote_code=False)
    assert not marker.exists()


# --- YAML tags and Hydra's own targets ----------------------------------------------------------------


def test_yaml_python_tag_in_a_config_file_is_one_line(tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    marker = tmp_path / "tag.marker"
    (conf / "evil.yaml").write_text(
        f"defaults:\n  - config\n  - _self_\nname: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    p = cli("-cd", str(conf), "-cn", "evil", "+experiment=dry_run", f"hydra.run.dir={tmp_path / 'r'}")
    refused(p, str(conf / "evil.yaml"), "!!python/object/apply:os.system")
    assert not marker.exists()


def test_yaml_python_tag_in_an_experiment_file_is_one_line(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "evil.yaml").write_text("# @package _global_\nname: !!python/name:os.system\n")
    p = cli(f"hydra.searchpath=[file://{tmp_path}]", "+experiment=evil", f"hydra.run.dir={tmp_path / 'r'}")
    refused(p, "evil.yaml", "!!python/name:os.system")


def test_yaml_tag_in_an_override_is_one_line(tmp_path):
    p = cli("checkpoint.model=!!python/object/apply:os.system [touch x]", f"hydra.run.dir={tmp_path / 'r'}")
    refused(p, "checkpoint.model=!!python", "YAML tags")


def test_hydra_callback_target_is_checked_before_hydra_imports_it(tmp_path):
    marker = tmp_path / "callback.marker"
    (tmp_path / "trap_cb.py").write_text(_marker_line(marker) + "class Cb:\n    pass\n")
    p = cli("+hydra.callbacks.trap={_target_: trap_cb.Cb}", "+experiment=dry_run", f"hydra.run.dir={tmp_path / 'r'}",
            extra_path=str(tmp_path))  # fmt: skip
    refused(p, "hydra.callbacks.trap._target_", "not allow-listed")
    assert not marker.exists()


# --- permissions come from the user, not from a config file -------------------------------------------


def _granting_config(tmp_path, ck, body: str):
    conf = tmp_path / "conf"
    conf.mkdir(exist_ok=True)
    head = "defaults:\n  - config\n  - _self_\nhydra:\n  searchpath: [pkg://pipeline.conf]\n"  # -cp replaces ours
    (conf / "theirs.yaml").write_text(f"{head}checkpoint:\n  path: {ck}\n{body}")
    (tmp_path / "experiment").mkdir(exist_ok=True)
    (tmp_path / "experiment" / "theirs.yaml").write_text(f"# @package _global_\ncheckpoint:\n  path: {ck}\n{body}")
    return conf


@pytest.mark.parametrize("how", ["--config-dir", "--config-path", "+experiment"])
def test_a_config_file_cannot_grant_trust_remote_code(remote_ck, tmp_path, how):
    """Someone else's YAML that sets checkpoint.trust_remote_code: true runs no code: exit 2 naming the key."""
    ck, marker = remote_ck
    conf = _granting_config(tmp_path, ck, "  trust_remote_code: true\n")
    chosen = {
        "--config-dir": ["-cd", str(conf), "-cn", "theirs"],
        "--config-path": ["-cp", str(conf), "-cn", "theirs"],  # composed by Hydra itself, not our pre-flight
        "+experiment": [f"hydra.searchpath=[file://{tmp_path}]", "+experiment=theirs"],
    }[how]
    p = cli(*chosen, "+experiment=dry_run" if how != "+experiment" else "stages=[instantiate_empty,plan]",
            f"hydra.run.dir={tmp_path / 'r'}")  # fmt: skip
    refused(p, "checkpoint.trust_remote_code", "granted by a config file", "checkpoint.trust_remote_code=true")
    assert not marker.exists()


def test_a_config_file_cannot_grant_pickles_or_loader_targets(tiny, tmp_path, evil_pickle):
    path, marker = evil_pickle
    for body, key in (
        ("  allow_pickle: true\n", "checkpoint.allow_pickle"),
        ("allow_targets: [torch.load]\n", "allow_targets"),
    ):
        conf = _granting_config(tmp_path, tiny("llama"), body)
        p = cli("-cd", str(conf), "-cn", "theirs", "+experiment=dry_run", f"hydra.run.dir={tmp_path / 'r'}")
        refused(p, key, "granted by a config file")
    assert not marker.exists()


def test_the_same_permission_given_on_the_command_line_holds(remote_ck, tmp_path):
    ck, marker = remote_ck
    conf = _granting_config(tmp_path, ck, "  trust_remote_code: true\n")
    p = cli("-cd", str(conf), "-cn", "theirs", "checkpoint.trust_remote_code=true", "+experiment=dry_run",
            f"hydra.run.dir={tmp_path / 'r'}")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert marker.exists()  # the user said so: its code ran
