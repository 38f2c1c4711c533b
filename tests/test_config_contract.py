"""The config as one typed contract (issue 31): each default written once, caps parsed once into a typed value.

A default written twice (a stage signature and its YAML, a dataclass and the schema) fails here when the two
disagree; caps reach the plan stage as one `MaxMemory`, however they were spelled, and bad ones are one line.
"""

from __future__ import annotations

import inspect
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
from helpers import run_cli
from omegaconf import OmegaConf

from pipeline.engine.binding import _source_key, locate
from pipeline.engine.compose import compose_config
from pipeline.engine.runner import bind_stages
from pipeline.errors import UserError
from pipeline.loading.shards import ReaderOptions
from pipeline.measure.metrics import OFF_BY_DEFAULT
from pipeline.parallel.spec import ParallelSpec
from pipeline.planning.device_map import ExplicitMap
from pipeline.quant.formats.bnb_keys import SavedQuantization
from pipeline.schema import GROUPS, ParallelSchema, QuantizationSchema
from pipeline.sizes import Caps, MaxMemory

STAGES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "pipeline" / "conf" / "stages").glob("*.yaml"))


def _schema_default(key: str):
    """The schema's default of `group.key` (None when the key is not a schema key)."""
    group, _, name = key.partition(".")
    schema = GROUPS.get(group)
    field = next((f for f in fields(schema) if f.name == name), None) if schema else None
    if field is None:
        return None
    return field.default_factory() if field.default is MISSING else field.default


def _stage_defaults():
    """(stage, key, source key, the value its YAML gives, the signature's default) for every defaulted key."""
    cfg = compose_config([f"stages=[{','.join(STAGES)}]"])
    for name in STAGES:
        node = cfg.stages[name]
        params = inspect.signature(locate(node._target_, f"stages.{name}")).parameters
        values = OmegaConf.to_container(node, resolve=True)
        for key, value in values.items():
            if key.startswith("_") or params[key].default is inspect.Parameter.empty:
                continue
            yield name, key, _source_key(node, key, f"stages.{name}"), value, params[key].default


def test_every_stage_default_is_the_yaml_value_or_the_schema_default():
    for name, key, source, value, default in _stage_defaults():
        if source.partition(".")[0] in GROUPS:  # interpolated from a group: the schema's default is the one
            wanted = _schema_default(source)
            if hasattr(type(default), "parse"):  # caps, device maps: the parsed form of the schema's default
                wanted = type(default).parse(wanted, source)
            assert default == wanted, f"stages.{name}.{key}: signature {default!r}, schema {source} {wanted!r}"
        elif default is None and isinstance(value, dict):  # switches: None means each one's default (on, but
            assert value == {k: k not in OFF_BY_DEFAULT for k in value}, f"stages.{name}.{key}"  # the held-out text)
        else:
            assert default == value, f"stages.{name}.{key}: signature {default!r}, YAML {value!r}"


def test_reader_options_defaults_are_the_load_shards_defaults():
    params = inspect.signature(locate("pipeline.stages.load_shards.load_shards", "x")).parameters
    node = compose_config([]).stages.load_shards
    for f in fields(ReaderOptions):
        assert params[f.name].default == f.default, f.name
        assert node[f.name] == f.default, f"pipeline/conf/stages/load_shards.yaml {f.name}"


def test_other_dataclasses_read_the_schema():
    assert SavedQuantization("int8", "x", {}).threshold == QuantizationSchema().threshold
    spec, schema = ParallelSpec(), ParallelSchema()
    assert (spec.mode, spec.timeout_s, spec.save_logits) == (schema.mode, schema.timeout_s, schema.save_logits)
    assert ParallelSpec.from_config({"mode": "tensor"}, dry_run=True).timeout_s == schema.timeout_s


def _plan_keywords(*overrides):
    return dict(bind_stages(compose_config(["stages=[instantiate_empty,plan]", *overrides])))["plan"].keywords


@pytest.mark.parametrize(
    "overrides",
    [
        ["memory.max_memory={cpu: 1GiB}"],
        ["memory.max_memory={cpu: 1073741824}"],
        ["memory=cpu_4gib", "memory.max_memory.cpu=1024MiB"],
        ["+memory.max_memory.cpu=1GiB"],
    ],
)
def test_caps_reach_the_plan_stage_typed_however_spelled(overrides):
    max_memory = _plan_keywords(*overrides)["max_memory"]
    assert max_memory == MaxMemory(Caps.of({"cpu": 2**30}), (), given=True)
    assert dict(max_memory.sizes) == {"cpu": 2**30} and isinstance(max_memory.sizes, Caps)


def test_no_caps_and_auto_caps_are_typed_too():
    assert _plan_keywords()["max_memory"] == MaxMemory()
    auto = _plan_keywords("memory.max_memory={0: auto, 1: 2GiB, cpu: auto}")["max_memory"]
    assert auto.auto == ("0", "cpu") and dict(auto.sizes) == {"1": 2 * 2**30} and auto.devices == ("0", "1", "cpu")
    assert MaxMemory.parse({"cuda:1": "2GiB", "CPU": "auto", 0: "auto"}) == auto  # a user's YAML spelling


def test_the_device_map_reaches_the_plan_stage_parsed():
    explicit = _plan_keywords("device_map=explicit", "device_map.map={model: 0, lm_head: cuda:0, model.norm: CPU}")
    assert dict(explicit["explicit_map"]) == {"model": "0", "lm_head": "0", "model.norm": "cpu"}
    assert isinstance(explicit["explicit_map"], ExplicitMap)


@pytest.mark.parametrize(
    "caps,message",
    [
        ("{cpu: inf}", r"memory\.max_memory\.cpu: inf is not a size; use bytes >= 0 or a string like 20GiB"),
        ("{cpu: -1}", r"memory\.max_memory\.cpu: -1 is negative; sizes are bytes >= 0"),
        ("{cpu: abc}", r"memory\.max_memory\.cpu: 'abc' is not a size; use bytes or a number with a unit"),
        (
            "{gpu0: 1GiB}",
            r"memory\.max_memory: unknown device key 'gpu0'; use a GPU index \(0, 1, \.\.\.\), cpu or disk",
        ),
    ],
)
def test_bad_caps_are_one_line_naming_the_key_before_any_stage_runs(caps, message):
    with pytest.raises(UserError, match=message) as exc:
        _plan_keywords(f"memory.max_memory={caps}")
    assert "\n" not in str(exc.value)


def test_bad_caps_from_the_command_line_are_exit_2_in_one_line(tmp_path):
    proc = run_cli("memory.max_memory={cpu: abc}", "stages=[instantiate_empty,plan]", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "memory.max_memory" in line]
    assert len(lines) == 1 and "memory.max_memory.cpu: 'abc' is not a size" in lines[0], proc.stderr
