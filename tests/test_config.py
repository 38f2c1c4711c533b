"""Config composition: every option of every group composes and binds to its stage's signature."""

from pathlib import Path

import pytest
from helpers import run_cli
from omegaconf import OmegaConf

from pipeline.engine.compose import compose_config
from pipeline.engine.runner import bind_stages
from pipeline.errors import UserError
from pipeline.quant.spec import QuantSpec
from pipeline.sizes import MaxMemory

CONF = Path(__file__).resolve().parents[1] / "pipeline" / "conf"
GROUPS = ["checkpoint", "dtype", "device_map", "memory", "quantization"]
STAGES = ["instantiate_empty", "plan", "quantize", "load_shards", "validate"]


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("override", [f"{g}={o}" for g in GROUPS for o in _options(g)])
def test_every_option_composes_and_binds(override):
    cfg = compose_config([override, "checkpoint.path=/models/x"])
    stages = bind_stages(cfg)  # resolves every stage node and checks its keys against the function
    assert [name for name, _ in stages] == STAGES
    assert cfg.name == "x"


def test_default_config():
    cfg = compose_config([])
    assert cfg.checkpoint.builtin == "smollm2" and cfg.checkpoint.path is None
    assert cfg.quantization.method == "int8" and cfg.quantization.threshold == 6.0
    assert list(cfg.stages) == STAGES
    assert cfg.name == "smollm2-135m-instruct"
    assert str(cfg.hydra.run.dir).startswith("runs/smollm2-135m-instruct/")


def test_stages_select_and_order():
    cfg = compose_config(["stages=[instantiate_empty,plan]"])
    assert list(cfg.stages) == ["instantiate_empty", "plan"]


def test_dry_run_experiment():
    cfg = compose_config(["+experiment=dry_run"])
    assert list(cfg.stages) == ["instantiate_empty", "plan"]


def test_unknown_stage_is_a_user_error():
    with pytest.raises(UserError, match="stages/unpack"):
        compose_config(["stages=[instantiate_empty,unpack]"])


def test_unknown_group_option_is_a_user_error():
    with pytest.raises(UserError, match="dtype"):
        compose_config(["dtype=fp12"])


def test_threshold_int_is_coerced():
    cfg = compose_config(["quantization.threshold=4"])
    q = QuantSpec.from_config(OmegaConf.to_container(cfg.quantization))
    assert q.threshold == 4.0 and isinstance(q.threshold, float)


@pytest.mark.parametrize("bad,match", [(-1, "negative"), ("abc", "not a number")])
def test_bad_threshold(bad, match):
    with pytest.raises(UserError, match=match):
        QuantSpec.from_config({"method": "int8", "threshold": bad})


def test_memory_caps_from_the_command_line_normalise_like_yaml():
    cfg = compose_config(["memory=gpu0_20gib", "+memory.max_memory.1=10GiB"])
    caps = MaxMemory.parse(OmegaConf.to_container(cfg.memory.max_memory)).sizes
    assert caps == {"0": 20 * 2**30, "1": 10 * 2**30, "cpu": 64 * 2**30}


def test_stage_with_unknown_key_names_it():
    cfg = compose_config(["+stages.validate.colour=blue"])
    with pytest.raises(UserError, match=r"unknown key stages\.validate\.colour"):
        bind_stages(cfg)


def test_stage_target_outside_allow_list_is_refused():
    cfg = compose_config(["stages.plan._target_=os.system"])
    with pytest.raises(UserError, match="os.system is not allow-listed"):
        bind_stages(cfg)


@pytest.mark.parametrize(
    "override", ["quantization.treshold=4.0", "+quantization.treshold=4.0", "++quantization.treshold=4.0"]
)
def test_unknown_group_key_names_the_closest(override):
    with pytest.raises(
        UserError, match=r"^quantization\.treshold: unknown key; did you mean quantization\.threshold\?$"
    ):
        compose_config([override])


def test_unknown_root_key_added_with_plus():
    with pytest.raises(UserError, match=r"^sweep_reuze: unknown key; did you mean sweep_reuse\?$"):
        compose_config(["+sweep_reuze=false"])


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "quantization.threshold=abc",
            "quantization.threshold: 'abc' is not a number; set quantization.threshold to a number",
        ),
        (
            "parallel.world_size=two",
            "parallel.world_size: 'two' is not an integer; set parallel.world_size to an integer",
        ),
        (
            "checkpoint.allow_missing=maybe",
            "checkpoint.allow_missing: 'maybe' is not true or false; set checkpoint.allow_missing to true or false",
        ),
    ],
)
def test_wrong_type_is_one_line_naming_the_key(override, message):
    with pytest.raises(UserError) as err:
        compose_config([override])
    assert str(err.value) == message


def test_group_file_of_ones_own_gets_the_schema(tmp_path):
    """A user's own group option without `_schema` in its defaults is checked against the schema all the same."""
    (tmp_path / "quantization").mkdir()
    (tmp_path / "quantization" / "mine.yaml").write_text("method: int8\ntreshold: 4.0\n")
    with pytest.raises(
        UserError, match=r"^quantization\.treshold: unknown key; did you mean quantization\.threshold\?$"
    ):
        compose_config(["quantization=mine"], config_dir=str(tmp_path))
    (tmp_path / "quantization" / "mine.yaml").write_text("method: int8\nthreshold: high\n")
    with pytest.raises(UserError, match=r"^quantization\.threshold: 'high' is not a number"):
        compose_config(["quantization=mine"], config_dir=str(tmp_path))


def test_unknown_option_lists_choices_without_the_schema():
    with pytest.raises(UserError) as err:
        compose_config(["dtype=bfloat16"])
    assert str(err.value).endswith("Could not find 'dtype/bfloat16'; choose one of: auto, bf16, fp16, fp32")


@pytest.mark.parametrize("config_dir", [False, True])
@pytest.mark.parametrize("override", ["+quantization.treshold=4.0", "dtype=bfloat16"])
def test_cli_composition_errors_are_one_line_exit_2(tmp_path, override, config_dir):
    args = ["--config-dir", str(tmp_path)] if config_dir else []
    out = run_cli(*args, override, cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert ("quantization.threshold" if "treshold" in override else "dtype/bfloat16") in lines[0]
