"""generation_config.json is honoured: generate() defaults are the ones from_pretrained gives (several eos ids)."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline import load
from pipeline.errors import UserError

PROMPT = torch.tensor([[5, 17, 42, 99, 7]])


def _greedy(model, **kwargs):
    with torch.inference_mode():
        return model.generate(PROMPT, do_sample=False, **kwargs)[0, PROMPT.shape[1] :].tolist()


def _eos_ids_hit_by_greedy(ck):
    """Two eos ids for the tiny model: one its greedy output reaches after a few tokens, one it never emits."""
    ref = AutoModelForCausalLM.from_pretrained(ck, local_files_only=True).eval()
    free = _greedy(ref, max_new_tokens=40, eos_token_id=None, pad_token_id=0)
    first_new = next(i for i, t in enumerate(free) if i >= 3 and t not in free[:i])
    unused = next(t for t in range(3, 256) if t not in free)
    return [unused, free[first_new]], first_new + 1


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_several_eos_ids_stop_generation_where_transformers_stops(quantization, tiny, tmp_path):
    ck = tmp_path / "chat"
    shutil.copytree(tiny("llama"), ck)
    eos, stop_len = _eos_ids_hit_by_greedy(ck)
    (ck / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos, "bos_token_id": 1, "pad_token_id": 0, "max_new_tokens": 30})
    )
    ref = AutoModelForCausalLM.from_pretrained(ck, local_files_only=True).eval()
    expected = _greedy(ref)
    assert len(expected) == stop_len < 30 and expected[-1] == eos[1]  # transformers stopped at an eos id

    result = load([f"checkpoint.path={ck}", f"quantization={quantization}"], run_dir=tmp_path / "run")
    assert result.report["status"] == "ok", result.report["error"]
    gen = result.model.generation_config
    assert gen.eos_token_id == eos and gen.max_new_tokens == 30
    assert gen.to_dict() == ref.generation_config.to_dict()
    if quantization == "none":
        assert _greedy(result.model) == expected


def test_without_the_file_the_config_comes_from_config_json(tiny, tmp_path):
    ck = tmp_path / "plain"
    shutil.copytree(tiny("llama"), ck)
    (ck / "generation_config.json").unlink()
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 7}))
    result = load([f"checkpoint.path={ck}", "quantization=none"], run_dir=tmp_path / "run")
    ref = AutoModelForCausalLM.from_pretrained(ck, local_files_only=True)
    assert result.model.generation_config.eos_token_id == 7
    assert result.model.generation_config.to_dict() == ref.generation_config.to_dict()


def test_generation_config_not_json_is_exit_2(tiny, tmp_path):
    ck = tmp_path / "bad"
    shutil.copytree(tiny("llama"), ck)
    (ck / "generation_config.json").write_text("{eos_token_id: [1, 2")
    with pytest.raises(UserError, match=r"generation_config.json: not valid JSON"):
        load([f"checkpoint.path={ck}", "quantization=none"], run_dir=tmp_path / "run")
