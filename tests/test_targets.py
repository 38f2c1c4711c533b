"""Only allow-listed `_target_`s are instantiated, and the rest are refused before import."""

import sys

import pytest
import torch

from pipeline.engine.binding import is_allowed, locate
from pipeline.errors import UserError


@pytest.fixture
def booby_trapped_module(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "trap_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef run(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("trap_mod", None)


def test_refused_before_import(booby_trapped_module):
    with pytest.raises(UserError, match="trap_mod.run is not allow-listed"):
        locate("trap_mod.run", "checkpoint.model")
    assert not booby_trapped_module.exists()


def test_user_allow_list_admits_it(booby_trapped_module):
    assert locate("trap_mod.run", "checkpoint.model", ["trap_mod.*"]).__name__ == "run"
    assert booby_trapped_module.exists()


@pytest.mark.parametrize(
    "target", ["os.system", "subprocess.run", "builtins.eval", "torch.load", "pipeline.engine.runner.run"]
)
def test_dangerous_targets(target):
    assert not is_allowed(target)


def test_model_classes_and_stages_allowed():
    assert locate("torch.nn.Linear", "k") is torch.nn.Linear
    assert locate("transformers.LlamaForCausalLM", "k").__name__ == "LlamaForCausalLM"
    assert is_allowed("pipeline.stages.plan.plan")


def test_transformers_non_model_refused():
    with pytest.raises(UserError, match="not a transformers model class"):
        locate("transformers.pipeline", "checkpoint.model")
