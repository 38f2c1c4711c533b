"""Issue 29: a module the caps put on disk is loaded, whatever quantization leaves it unquantized.

The planner used to split a leaf module that did not fit (an untied `lm_head`) into its tensors, so
the device map said `lm_head.weight: disk`; accelerate's hooks attach to modules, so that weight
stayed on meta. Leaf modules are now placed whole, as accelerate's planner places them.
"""

from __future__ import annotations

import json

import pytest
import torch
from architectures import DECODER, Arch, build, inputs_for

from pipeline import load

QWEN2_UNTIED = Arch("qwen2", "Qwen2Config", "Qwen2ForCausalLM", dict(DECODER, tie_word_embeddings=False))
NO_METRICS = [f"stages.validate.metrics.{m}=false" for m in ("perplexity", "reference", "greedy", "throughput")]


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return build(QWEN2_UNTIED, tmp_path_factory.mktemp("qwen2_untied"), shards=3)


def _sizes(run_dir) -> dict[str, int]:
    plan = json.loads((run_dir / "plan.json").read_text())
    return {name: t["bytes"] for name, t in plan["tensors"].items()}


@pytest.mark.parametrize("method", ["int8", "nf4", "none"])
def test_untied_head_on_disk_is_loaded(method, untied, tmp_path):
    base = [f"checkpoint.path={untied}", f"quantization={method}", *NO_METRICS]
    one = load(base, run_dir=tmp_path / "one")
    sizes = _sizes(tmp_path / "one")
    head = sizes["lm_head.weight"]
    cap = sum(sizes.values()) - head // 2  # everything but the head fits in memory
    off = load([*base, f"memory.max_memory={{cpu: {cap}, disk: 1GiB}}"], run_dir=tmp_path / "off")
    report = off.report
    assert report["plan"]["device_map"]["lm_head"] == "disk"
    assert not any(k.endswith(".weight") for k in report["plan"]["device_map"]), report["plan"]["device_map"]
    assert report["plan"]["predicted_bytes"]["disk"] == head
    assert all(report["validation"]["checks"].values()), report["validation"]["checks"]
    assert set(report["validation"]["plan_error"].values()) == {0.0}
    inputs = inputs_for(one.model)
    with torch.no_grad():
        assert torch.equal(off.model(**inputs).logits, one.model(**inputs).logits)


def test_leaf_modules_are_never_split_into_tensor_entries(untied, tmp_path):
    """However tight the caps, every device_map entry names a module (a tensor entry would not be loaded)."""
    base = [f"checkpoint.path={untied}", "quantization=none", "+experiment=dry_run"]
    load(base, run_dir=tmp_path / "full")
    sizes = _sizes(tmp_path / "full")
    for cap in range(4096, sum(sizes.values()), 8192):
        plan = load([*base, f"memory.max_memory={{cpu: {cap}, disk: 1GiB}}"], run_dir=tmp_path / str(cap)).report
        assert not set(plan["plan"]["device_map"]) & set(sizes), (cap, plan["plan"]["device_map"])


def test_nested_explicit_map_is_flattened_for_accelerate(tiny, tmp_path):
    """An explicit map with an entry inside another (`model: cpu` around `model.layers.1: disk`) is split
    into children before dispatch: accelerate's hook on `model` would move the still-meta disk layer."""
    ck = tiny("llama")
    base = [f"checkpoint.path={ck}", "quantization=none", *NO_METRICS]
    one = load([*base, "device_map=cpu"], run_dir=tmp_path / "one")
    nested = [*base, "device_map=explicit", "device_map.map={model: cpu, model.layers.1: disk, lm_head: cpu}"]
    r = load(nested, run_dir=tmp_path / "nested")
    dmap = r.report["plan"]["device_map"]
    assert dmap["model.layers.1"] == "disk" and "model" not in dmap and dmap["model.layers.0"] == "cpu"
    assert all(r.report["validation"]["checks"].values()), r.report["validation"]["checks"]
    inputs = inputs_for(one.model)
    with torch.no_grad():
        assert torch.equal(r.model(**inputs).logits, one.model(**inputs).logits)
