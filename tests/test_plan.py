"""The planner: strategies over declared devices, no-split classes, tied weights, int8 sizes, offload."""

import json

import pytest
import torch
from helpers import run_cli

from pipeline import load
from pipeline.checkpoint.synthetic import write_checkpoint
from pipeline.errors import UserError


def _dry(path, tmp_path, *overrides):
    result = load([f"checkpoint.path={path}", "+experiment=dry_run", *overrides], run_dir=tmp_path / "plan")
    return result.report["plan"], json.loads((tmp_path / "plan" / "plan.json").read_text())


def _total(plan_json):
    return sum(t["bytes"] for t in plan_json["tensors"].values())


def test_sequential_fills_gpu_0_first(tiny, tmp_path):
    plan, _ = _dry(tiny("llama"), tmp_path, "device_map=sequential", "memory.max_memory={0: 1GiB, 1: 1GiB, cpu: 1GiB}")
    assert plan["device_map"] == {"": "0"}


def test_balanced_spreads_over_gpus(tiny, tmp_path):
    plan, doc = _dry(
        tiny("llama"),
        tmp_path,
        "device_map=balanced",
        "quantization=none",
        "memory.max_memory={0: 1GiB, 1: 1GiB, cpu: 1GiB}",
    )
    pred = plan["predicted_bytes"]
    assert set(pred) == {"0", "1"}
    assert abs(pred["0"] - pred["1"]) <= 150 * 1024  # within one decoder layer (~148 KiB) of even
    assert sum(pred.values()) == _total(doc)


def test_auto_with_two_gpus_balances(tiny, tmp_path):
    plan, _ = _dry(tiny("llama"), tmp_path, "device_map=auto", "quantization=none", "memory=two_gpus_40gib")
    assert set(plan["predicted_bytes"]) == {"0", "1"}


def test_balanced_low_0_keeps_gpu_0_mostly_free(tiny, tmp_path):
    plan, _ = _dry(
        tiny("llama"),
        tmp_path,
        "device_map=balanced_low_0",
        "quantization=none",
        "memory.max_memory={0: 1GiB, 1: 1GiB, 2: 1GiB, cpu: 1GiB}",
    )
    pred = plan["predicted_bytes"]
    assert pred.get("0", 0) < min(pred["1"], pred["2"])


def test_no_split_classes_are_never_cut(tiny, tmp_path):
    plan, _ = _dry(
        tiny("llama"),
        tmp_path,
        "device_map=sequential",
        "quantization=none",
        "memory.max_memory={0: 100KiB, 1: 200KiB, 2: 200KiB, cpu: 1GiB}",
    )
    assert len(set(plan["device_map"].values())) > 1
    for key in plan["device_map"]:
        parts = key.split(".")
        assert not (len(parts) > 3 and parts[1] == "layers"), key  # nothing below model.layers.N


def test_int8_sizes_count_the_row_scales(tiny, tmp_path):
    _, doc = _dry(tiny("llama"), tmp_path, "quantization=int8")
    t = doc["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert t == {"device": "cpu", "dtype": "int8", "bytes": 128 * 64 + 4 * 128, "shape": [128, 64], "quantized": "int8"}
    assert doc["tensors"]["lm_head.weight"]["tied_to"] == "model.embed_tokens.weight"
    assert doc["tensors"]["lm_head.weight"]["bytes"] == 0


def test_explicit_map_must_cover_every_parameter(tiny, tmp_path):
    with pytest.raises(UserError, match="no entry covers 'lm_head.weight'"):
        _dry(tiny("llama"), tmp_path, "device_map=explicit", "device_map.map={model: cpu}")


def test_explicit_map_keeps_tied_weights_together(tiny, tmp_path):
    with pytest.raises(UserError, match="tied weights .* different devices"):
        _dry(tiny("llama"), tmp_path, "device_map=explicit", "device_map.map={model: cpu, lm_head: 0}")


def test_explicit_deepest_prefix_wins(tiny, tmp_path):
    plan, doc = _dry(
        tiny("llama"), tmp_path, "device_map=explicit", "device_map.map={model: 0, model.layers.2: 1, lm_head: 0}"
    )
    assert doc["tensors"]["model.layers.2.mlp.up_proj.weight"]["device"] == "1"
    assert doc["tensors"]["model.layers.1.mlp.up_proj.weight"]["device"] == "0"


def test_auto_cap_reads_free_memory(tiny, tmp_path):
    plan, _ = _dry(tiny("llama"), tmp_path, "memory.max_memory={cpu: auto}")
    assert plan["max_memory"]["cpu"] > 2**20


def test_cap_without_offload_target_is_exit_2(tiny, tmp_path):
    p = run_cli(
        f"checkpoint.path={tiny('llama')}",
        "+experiment=dry_run",
        "device_map=sequential",
        "memory.max_memory={0: 100KiB}",
        f"hydra.run.dir={tmp_path / 'r'}",
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: memory.max_memory.0: ")
    assert "bytes" in p.stderr and "missing" in p.stderr


def test_disk_offload_reads_weights_in_place_and_matches(tiny, tmp_path):
    path = tiny("llama")
    ids = torch.arange(16).unsqueeze(0)
    full = load([f"checkpoint.path={path}", "quantization=none"], run_dir=tmp_path / "full").model
    off = load(
        [f"checkpoint.path={path}", "quantization=none", "memory.max_memory={cpu: 200KiB, disk: 1GiB}"],
        run_dir=tmp_path / "off",
    )
    r = off.report
    assert r["status"] == "ok" and set(r["plan"]["predicted_bytes"]) == {"cpu", "disk"}
    assert r["validation"]["plan_error"] == {"cpu": 0.0, "disk": 0.0}
    assert r["load"]["bytes_read"] < r["checkpoint"]["bytes"]  # disk modules were not read
    assert not list((tmp_path / "off").glob("**/*.dat"))  # no offload folder: the shards are read in place
    with torch.inference_mode():
        assert torch.equal(off.model(ids).logits, full(ids).logits)


def test_int8_is_not_applied_to_disk_offloaded_layers(tiny, tmp_path):
    r = load(
        [f"checkpoint.path={tiny('llama')}", "memory.max_memory={cpu: 100KiB, disk: 1GiB}"], run_dir=tmp_path / "r"
    ).report
    assert r["status"] == "ok"
    reasons = r["quantization"]["skipped_reasons"]
    assert any(v.startswith("offloaded to disk") for v in reasons.values())
    assert r["quantization"]["quantized"] + sum(v.startswith("offloaded to disk") for v in reasons.values()) == 21


def test_70b_dry_run_plans_two_gpus_and_cpu(tmp_path):
    ck = write_checkpoint(str(tmp_path / "l70"), "llama-70b", sparse=True)
    p = run_cli(
        f"checkpoint.path={ck}",
        "+experiment=dry_run",
        "quantization=none",
        "memory.max_memory={0:40GiB,1:40GiB,cpu:200GiB}",
        f"hydra.run.dir={tmp_path / 'r'}",
    )
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "r" / "report.json").read_text())
    pred = r["plan"]["predicted_bytes"]
    assert set(pred) == {"0", "1", "cpu"} and pred["0"] <= 40 * 2**30 and pred["1"] <= 40 * 2**30
    rotary = 2 * 64 * 4  # inv_freq and original_inv_freq: fp32 buffers the skeleton makes, not in the checkpoint
    assert sum(pred.values()) == r["checkpoint"]["bytes"] + rotary
