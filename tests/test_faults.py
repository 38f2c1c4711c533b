"""Faults in the middle of a run: Ctrl-C and a real out-of-memory, through the CLI with user stages."""

import json

from helpers import REPO, run_cli, tree_digest


def _user_stage_dir(tmp_path, name, target, **params):
    d = tmp_path / "userconf" / "stages"
    d.mkdir(parents=True)
    lines = [f"{name}:", f"  _target_: {target}", "  _partial_: true"] + [f"  {k}: {v}" for k, v in params.items()]
    (d / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    return tmp_path / "userconf"


def test_ctrl_c_marks_the_run_interrupted(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests"))
    conf = _user_stage_dir(tmp_path, "boom", "stage_helpers.interrupt")
    out = tmp_path / "run"
    p = run_cli(
        f"--config-dir={conf}",
        f"checkpoint.path={tiny('llama')}",
        "allow_targets=[stage_helpers.*]",
        "stages=[instantiate_empty,plan,boom,quantize,load_shards,validate]",
        f"hydra.run.dir={out}",
    )
    assert p.returncode == 130, p.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted"
    assert [(s["name"], s["status"]) for s in report["stages"]] == [
        ("instantiate_empty", "ok"),
        ("plan", "ok"),
        ("boom", "interrupted"),
    ]
    assert "interrupted" in p.stderr.strip().splitlines()[-1]


def test_out_of_memory_names_the_stage_and_frees(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    ck = tmp_path / "ck"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32768, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4
        )
    ).save_pretrained(ck, max_shard_size="40MB")
    before = tree_digest(ck)
    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests"))
    conf = _user_stage_dir(tmp_path, "limit", "stage_helpers.limit_address_space", extra_mib=12)
    out = tmp_path / "run"
    p = run_cli(
        f"--config-dir={conf}",
        f"checkpoint.path={ck}",
        "allow_targets=[stage_helpers.*]",
        "dtype=fp16",
        "quantization=none",
        "stages.load_shards.reader=safetensors",
        "stages=[instantiate_empty,plan,quantize,limit,load_shards,validate]",
        f"hydra.run.dir={out}",
    )
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2, p.stderr[-2000:]
    assert last.startswith("error: out of memory in stage load_shards"), last
    assert "Traceback" not in p.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "error" and report["stages"][-1]["name"] == "load_shards"
    assert tree_digest(ck) == before
