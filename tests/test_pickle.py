"""Pickle checkpoints: refused unless asked, then read only with torch.load(weights_only=True)."""

import json
import pickle
import shutil

import torch
from helpers import run_cli, tree_digest

from pipeline import load


def _pickle_checkpoint(src, dest):
    dest.mkdir()
    shutil.copy(src / "config.json", dest / "config.json")
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(src).state_dict()
    torch.save(state, dest / "pytorch_model.bin")
    return dest, state


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickle_is_refused_unless_asked(tiny, tmp_path):
    ck, _ = _pickle_checkpoint(tiny("llama"), tmp_path / "ck")
    before = tree_digest(ck)
    p = run_cli(f"checkpoint.path={ck}", f"hydra.run.dir={tmp_path / 'run'}")
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "pytorch_model.bin" in last and "checkpoint.allow_pickle=true" in last
    assert "Traceback" not in p.stderr and tree_digest(ck) == before


def test_opted_in_pickle_loads_bit_for_bit(tiny, tmp_path):
    ck, state = _pickle_checkpoint(tiny("llama"), tmp_path / "ck")
    result = load(
        [f"checkpoint.path={ck}", "checkpoint.allow_pickle=true", "quantization=none"], run_dir=tmp_path / "run"
    )
    assert result.report["status"] == "ok" and result.report["checkpoint"]["format"] == "pickle"
    ours = result.model.state_dict()
    for name, t in state.items():
        assert torch.equal(ours[name], t), name


def test_malicious_pickle_is_refused_and_runs_nothing(tiny, tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    shutil.copy(tiny("llama") / "config.json", ck / "config.json")
    marker = tmp_path / "pwned"
    with open(ck / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": _Evil(marker)}, fh)
    out = tmp_path / "run"
    p = run_cli(f"checkpoint.path={ck}", "checkpoint.allow_pickle=true", f"hydra.run.dir={out}")
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2, p.stderr[-2000:]
    assert "refused by torch.load(weights_only=True)" in last and "pytorch_model.bin" in last
    assert not marker.exists()
    assert json.loads((out / "report.json").read_text())["status"] == "error"
