"""The CLI in a subprocess: run artifacts, exit codes 0/1/2, one clear last line on errors."""

import json
import shutil

import pytest
from helpers import run_cli, tree_digest
from safetensors.torch import load_file, save_file

STAGES = ["instantiate_empty", "plan", "quantize", "load_shards", "validate"]


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_run_writes_artifacts_and_summary(tiny, tmp_path):
    path = tiny("llama")
    before = tree_digest(path)
    out = tmp_path / "run"
    p = run_cli("checkpoint=hf_dir", f"checkpoint.path={path}", f"hydra.run.dir={out}")
    assert p.returncode == 0, p.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["error"] is None
    assert [s["name"] for s in report["stages"]] == STAGES and all(s["status"] == "ok" for s in report["stages"])
    assert set(report) >= {"status", "checkpoint", "stages", "plan", "load", "quantization", "validation", "error"}
    assert report["checkpoint"]["files"] >= 3 and report["checkpoint"]["format"] == "safetensors"
    for f in ("plan.json", "run.log", ".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml"):
        assert (out / f).is_file(), f
    assert "predicted" in p.stdout and "measured" in p.stdout and "validation: 11/11 checks passed" in p.stdout
    assert "int8: 21 layers quantized" in p.stdout
    assert tree_digest(path) == before


def test_dry_run_reads_no_tensor(tiny, tmp_path):
    out = tmp_path / "run"
    p = run_cli(f"checkpoint.path={tiny('gpt2')}", "+experiment=dry_run", f"hydra.run.dir={out}")
    assert p.returncode == 0, p.stderr
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["instantiate_empty", "plan"] and report["load"] is None
    assert json.loads((out / "plan.json").read_text())["predicted_bytes"]


@pytest.mark.parametrize(
    "args,culprit",
    [
        (["checkpoint.path=/nonexistent/model"], "/nonexistent/model"),
        (["stages=[instantiate_empty,unpack]"], "stages/unpack"),
        (["dtype=fp12"], "dtype"),
        (["quantization.threshold=-1"], "quantization.threshold"),
        (["quantization.threshold=abc"], "quantization.threshold"),
        (["quantization=nf4", "quantization.blocksize=100"], "quantization.blocksize"),
        (["quantization.offloaded=sometimes"], "quantization.offloaded"),
        (["quantization=int4"], "quantization/int4"),
        (["memory.max_memory={cpu: 12 parsecs}"], "memory.max_memory.cpu"),
        (["memory.max_memory={gpu7: 1GiB}"], "gpu7"),
        (["stages.plan._target_=os.system"], "os.system"),
    ],
)
def test_bad_input_exits_2_naming_the_culprit(args, culprit, tiny, tmp_path):
    base = [] if any(a.startswith("checkpoint.path") for a in args) else [f"checkpoint.path={tiny('llama')}"]
    p = run_cli(*base, *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert culprit in _last_line(p.stderr)
    assert "Traceback" not in p.stderr


def _copy_with_nan(src, dest, name):
    """A copy of a sharded checkpoint in which one weight holds a NaN (the source is never touched)."""
    shutil.copytree(src, dest)
    for shard in dest.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name].view(-1)[0] = float("nan")
            save_file(tensors, shard, metadata={"format": "pt"})
    return dest


def test_failed_check_exits_1_and_names_the_weight(tiny, tmp_path):
    # a tensor missing from the checkpoint is exit 2 at plan time (test_incomplete.py); a NaN is a failed check
    path = _copy_with_nan(tiny("llama"), tmp_path / "ck", "model.layers.0.self_attn.q_proj.weight")
    out = tmp_path / "run"
    p = run_cli(f"checkpoint.path={path}", "quantization=none", f"hydra.run.dir={out}")
    assert p.returncode == 1, p.stderr
    assert "model.layers.0.self_attn.q_proj.weight" in _last_line(p.stderr)
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed" and report["stages"][-1]["status"] == "failed"
    assert "FAILED" in p.stdout


def test_sweep_keeps_going_past_a_failed_job(tiny, tmp_path):
    sweep = tmp_path / "sweep"
    p = run_cli(
        "-m", f"checkpoint.path={tiny('bloom')},{tmp_path / 'missing'}", "quantization=none", f"hydra.sweep.dir={sweep}"
    )
    assert p.returncode == 1, p.stderr  # every job ran; the failed one makes the sweep's exit 1
    statuses = sorted(json.loads((sweep / str(i) / "report.json").read_text())["status"] for i in (0, 1))
    assert statuses == ["error", "ok"]
