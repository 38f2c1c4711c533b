"""transformers' internals are reached only through pipeline/hf, and a moved one is one clear line.

A transformers release that renames a private attribute or moves a module must break in one
place (pipeline/hf) with exit 2 naming the installed version and the tested range, never with a
KeyError deep inside a stage. This test keeps every other module off transformers' private
names: no import of a transformers submodule, no private attribute of its model, config, auto or
quantizer classes, no internal entry point, by attribute or through getattr/hasattr/setattr.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest
import torch
from helpers import REPO
from packaging.version import Version

from pipeline.errors import UserError
from pipeline.hf import NEWEST_TESTED, OLDEST, installed
from pipeline.hf.modeling import auto_class_for
from pipeline.hf.tensor_parallel import OLDEST_WITH_API

ADAPTER = REPO / "pipeline" / "hf"
# Internal entry points with public-looking names (on top of every `_name` transformers' classes define).
INTERNAL = {
    "adjust_generation_fn",
    "get_class_from_dynamic_module",
    "should_convert_module",
    "AutoHfQuantizer",
    "ALL_PARALLEL_STYLES",
    "TensorParallelLayer",
    "get_kv_heads_per_rank",
    "get_model_conversion_mapping",
    "rename_source_key",
    "dot_natural_key",
    "WeightConverter",
    "WeightRenaming",
    "core_model_loading",
}


REFLECTION = {"getattr", "hasattr", "setattr", "delattr"}


def _private_names() -> set[str]:
    """`_names` transformers' model, config, generation, auto and quantizer classes define beyond nn.Module's."""
    import transformers
    from transformers.models.auto.auto_factory import _BaseAutoModelClass
    from transformers.quantizers.base import HfQuantizer

    classes = (transformers.PreTrainedModel, transformers.PretrainedConfig, transformers.GenerationMixin)
    names = {n for c in (*classes, _BaseAutoModelClass, HfQuantizer) for n in dir(c)}
    names |= {
        "_model_mapping",
        "_checkpoint_conversion_mapping",
        "_hf_quantized_needs_local_tp",
        "_tp_plan",
        "_is_hf_initialized",
    }
    private = {n for n in names if n.startswith("_") and not n.startswith("__")}
    return private - set(dir(torch.nn.Module)) | INTERNAL


def _uses(path) -> list[str]:
    """transformers submodule imports and private names a module uses (attributes, getattr strings, imports)."""
    tree = ast.parse(path.read_text())
    private = _private_names()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers."):
            found.append(f"from {node.module} import")
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.startswith("transformers.")]
        if isinstance(node, ast.ImportFrom) and node.module == "transformers":
            found += [a.name for a in node.names if a.name in private]
        elif isinstance(node, ast.Attribute) and node.attr in private:
            found.append(f".{node.attr}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in REFLECTION and len(node.args) > 1:
            name = node.args[1]
            if isinstance(name, ast.Constant) and name.value in private:
                found.append(f"{node.func.id}(..., {name.value!r})")
    return [f"{path.relative_to(REPO)}:{f}" for f in found]


def test_private_transformers_names_only_in_the_adapter():
    outside = [p for p in sorted((REPO / "pipeline").rglob("*.py")) if ADAPTER not in p.parents]
    found = [hit for path in outside for hit in _uses(path)]
    assert not found, f"transformers internals outside pipeline/hf (move them into the adapter): {found}"


def test_the_scan_sees_what_it_must_refuse(tmp_path):
    """The scan itself: each way of reaching an internal is caught."""
    probe = REPO / "pipeline" / "_probe_for_test.py"
    probe.write_text(
        "from transformers.modeling_utils import PreTrainedModel\n"
        "def f(m, cls):\n"
        "    return m._keep_in_fp32_modules, getattr(cls, '_from_config'), m.adjust_generation_fn\n"
    )
    try:
        hits = _uses(probe)
    finally:
        probe.unlink()
    assert len(hits) == 4, hits


def test_the_tested_range_is_the_lock_and_pyproject():
    lock = (REPO / "constraints.txt").read_text()
    assert re.search(rf"^transformers=={re.escape(NEWEST_TESTED)}$", lock, re.M), "NEWEST_TESTED != the lock"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"transformers>={OLDEST}"' in pyproject, "OLDEST != pyproject.toml's lower bound"


def test_a_moved_internal_is_one_line_naming_the_version_and_range():
    class NotAnAutoClass:  # what an auto class looks like to us after a release that renamed its mapping
        pass

    with pytest.raises(UserError) as info:
        auto_class_for(NotAnAutoClass, object())
    message = str(info.value)
    assert "\n" not in message
    assert f"transformers {installed()}" in message and f"{OLDEST} to {NEWEST_TESTED}" in message


def test_the_cli_turns_it_into_exit_2(tmp_path):
    """Through the real CLI: an adapter function failing mid-plan ends in exit 2 and that one line."""
    code = (
        "import sys, pipeline.hf.modeling as m\n"
        "from pipeline.hf import unsupported\n"
        "def moved(*a, **k):\n"
        "    raise unsupported('PreTrainedModel.adjust_generation_fn')\n"
        "m.adjust_generation.__code__ = moved.__code__\n"
        "from pipeline.__main__ import main\n"
        "sys.argv = ['model-loader', 'checkpoint=hf_dir', 'checkpoint.path=' + sys.argv[1], 'quantization=none',\n"
        "            'stages=[instantiate_empty,plan]', 'hydra.run.dir=' + sys.argv[2]]\n"
        "main()\n"
    )
    from helpers import make_checkpoint

    path = make_checkpoint("llama", tmp_path / "ck")
    p = subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO
    )
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "adjust_generation_fn is missing or changed" in errors[0], p.stderr[-2000:]


@pytest.mark.skipif(Version(installed()) >= Version(OLDEST_WITH_API), reason="this transformers has the TP API")
def test_tensor_parallel_on_an_older_transformers_is_one_line(tmp_path):
    """Below 5.24 (scripts/compat.sh runs it there): parallel=tensor names the version it needs, exit 2."""
    from helpers import make_checkpoint

    from pipeline import load

    path = make_checkpoint("llama", tmp_path / "ck")
    with pytest.raises(UserError, match=rf"transformers {re.escape(installed())} lacks .* transformers>=5.24"):
        load(
            [f"checkpoint.path={path}", "parallel=tensor", "parallel.world_size=2", "stages=[instantiate_empty,plan]"],
            run_dir=tmp_path / "run",
        )
