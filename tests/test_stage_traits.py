"""The engine knows stages only through their signatures and declared traits; stages never ask which strategy runs.

A user's own stage (allow_targets, as test_faults adds them) declares a precheck and that it
loads weights, and the engine treats it as it treats ours; no stage module asks whether the
run is tensor parallel, and no engine module names a stage.
"""

from __future__ import annotations

import ast
import json

import pytest
import torch
from helpers import REPO, run_cli

from pipeline.quant.bnb import import_bitsandbytes, set_int8_thresholds

USER_STAGES = """
from pipeline.errors import UserError
from pipeline.stages.traits import stage


def _precheck(cfg, run_dir, keys):
    if keys.get("word") == "no":
        raise UserError("stages.checked.word: 'no' is refused by the stage's own check; give another word")


@stage(precheck=_precheck)
def checked(ctx, *, word: str = "yes"):
    ctx.report["checked"] = word


@stage(loads_weights=True)
def loader(ctx):
    ctx.report["loader"] = True
"""


@pytest.fixture
def user_stages(tmp_path, monkeypatch):
    """A module of user stages on PYTHONPATH and a config dir with their nodes."""
    (tmp_path / "user_traits.py").write_text(USER_STAGES)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{REPO / 'tests'}")
    conf = tmp_path / "userconf" / "stages"
    conf.mkdir(parents=True)
    (conf / "checked.yaml").write_text("checked:\n  _target_: user_traits.checked\n  _partial_: true\n  word: yes\n")
    (conf / "loader.yaml").write_text("loader:\n  _target_: user_traits.loader\n  _partial_: true\n")
    return ["--config-dir", str(tmp_path / "userconf"), "allow_targets=[user_traits.*]"]


def test_a_stage_checks_its_own_keys_before_any_stage_runs(tiny, tmp_path, user_stages):
    common = [*user_stages, f"checkpoint.path={tiny('llama')}", "stages=[instantiate_empty,plan,checked]"]
    bad = run_cli(*common, "stages.checked.word=no", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert (
        bad.stderr.strip() == "error: stages.checked.word: 'no' is refused by the stage's own check; give another word"
    )
    assert json.loads((tmp_path / "bad" / "report.json").read_text())["stages"] == []  # nothing ran
    good = run_cli(*common, "stages.checked.word=fine", f"hydra.run.dir={tmp_path / 'good'}")
    assert good.returncode == 0, good.stderr[-2000:]
    assert json.loads((tmp_path / "good" / "report.json").read_text())["checked"] == "fine"


def test_a_stage_that_loads_weights_makes_tensor_parallel_need_torchrun(tiny, tmp_path, user_stages):
    common = [*user_stages, f"checkpoint.path={tiny('llama')}", "parallel=tensor", "parallel.world_size=2"]
    dry = run_cli(*common, "stages=[instantiate_empty,plan]", f"hydra.run.dir={tmp_path / 'dry'}")
    assert dry.returncode == 0, dry.stderr[-2000:]  # no stage reads weights: every rank planned here
    real = run_cli(*common, "stages=[instantiate_empty,plan,loader]", f"hydra.run.dir={tmp_path / 'real'}")
    assert real.returncode == 2, real.stderr[-2000:]
    assert real.stderr.strip() == (
        "error: parallel.world_size=2: this process was not started by torchrun (no RANK/WORLD_SIZE in the "
        "environment); launch it with torchrun --nproc_per_node N -m pipeline parallel=tensor ..., or plan only: "
        "stages=[instantiate_empty,plan]"
    )


def _code(package: str):
    """(module path, AST) of every module of a pipeline package."""
    for path in sorted((REPO / "pipeline" / package).glob("*.py")):
        yield path.relative_to(REPO), ast.parse(path.read_text())


def test_no_stage_asks_which_strategy_runs():
    which = ("enabled", "is_main", "rank", "distributed", "world_size", "spec")
    asked = []
    for path, tree in _code("stages"):
        for node in ast.walk(tree):
            on_parallel = isinstance(node, ast.Attribute) and ast.unparse(node.value).endswith("parallel")
            if on_parallel and node.attr in which:
                asked.append(f"{path}:{node.lineno} {ast.unparse(node)}")
            module = node.module or "" if isinstance(node, ast.ImportFrom) else ""
            if module.startswith("parallel.") and module != "parallel.strategy":
                asked.append(f"{path}:{node.lineno} imports {module}")
    assert not asked, asked


def test_the_engine_names_no_stage():
    stage_names = {p.stem for p in (REPO / "pipeline" / "conf" / "stages").glob("*.yaml")} - {"plan"}
    assert {"load_shards", "validate", "save"} <= stage_names  # ("plan" is also report.json's section)
    named = []
    for path, tree in _code("engine"):
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body and isinstance(n.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in stage_names and id(node) not in docstrings:
                named.append(f"{path}:{node.lineno} {node.value!r}")
    assert not named, named


def test_int8_thresholds_change_in_place_keeping_per_module_ones():
    bnb = import_bitsandbytes()
    model = torch.nn.Sequential(
        bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False, threshold=6.0),
        torch.nn.Linear(8, 8),
        bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False, threshold=6.0),
    )
    set_int8_thresholds(model, {"2": 1.5}, 4.0)
    assert (model[0].state.threshold, model[2].state.threshold) == (4.0, 1.5)
