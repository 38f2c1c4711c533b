"""Property test: a plan that was accepted never ends in a failed load.

hypothesis draws small real models (Llama or Qwen2: layers, widths, tied or untied head, number of
shards), a quantization, a dtype and memory caps (CPU only, or CPU + disk, from far too small to
ample). Each run either ends with exit 2 at plan time, before any weight byte is read, with one line
naming why, or loads with every check passing and plan error 0. Never exit 1, never an internal error.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import load
from pipeline.errors import UserError

PROPERTY = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
NO_METRICS = [f"stages.validate.metrics.{m}=false" for m in ("perplexity", "reference", "greedy", "throughput")]

models = st.fixed_dictionaries(
    {
        "family": st.sampled_from(["llama", "qwen2"]),
        "layers": st.integers(1, 3),
        "hidden": st.sampled_from([32, 64]),
        "tied": st.booleans(),
        "shards": st.integers(1, 3),
    }
)
loads = st.fixed_dictionaries(
    {
        "quantization": st.sampled_from(["none", "int8", "nf4"]),
        "dtype": st.sampled_from(["fp32", "bf16"]),
        "cpu_kib": st.sampled_from([8, 64, 256, 1024, 65536]),
        "disk": st.booleans(),
    }
)


def _build(spec: dict, dest) -> str:
    import transformers

    name = {"llama": "Llama", "qwen2": "Qwen2"}[spec["family"]]
    config = getattr(transformers, f"{name}Config")(
        vocab_size=128, hidden_size=spec["hidden"], intermediate_size=2 * spec["hidden"],
        num_hidden_layers=spec["layers"], num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=spec["tied"], max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(dest, max_shard_size=max(total // spec["shards"], 1) if spec["shards"] > 1 else total * 2)
    return str(dest)


@PROPERTY
@given(model=models, how=loads)
def test_an_accepted_plan_always_loads(model, how, tmp_path_factory):
    key = json.dumps(model, sort_keys=True)
    path = _CHECKPOINTS.get(key) or _CHECKPOINTS.setdefault(key, _build(model, tmp_path_factory.mktemp("prop")))
    caps = f"cpu: {how['cpu_kib']}KiB" + (", disk: 1GiB" if how["disk"] else "")
    overrides = [
        f"checkpoint.path={path}", f"quantization={how['quantization']}", f"dtype={how['dtype']}",
        f"memory.max_memory={{{caps}}}", "device_map=auto", *NO_METRICS,
    ]  # fmt: skip
    run = tmp_path_factory.mktemp("run")
    try:
        result = load(overrides, run_dir=run)
    except UserError as exc:
        report = exc.result.report
        assert "\n" not in str(exc)
        assert report["load"] is None, f"refused after bytes were read: {exc}"
        assert [s["name"] for s in report["stages"]][-1] in ("instantiate_empty", "plan"), report["stages"]
        return
    v = result.report["validation"]
    assert result.report["status"] == "ok" and all(v["checks"].values()), v.get("failures")
    assert set(v["plan_error"].values()) == {0.0}, v["plan_error"]


_CHECKPOINTS: dict[str, str] = {}


@pytest.fixture(autouse=True, scope="module")
def _fresh_checkpoints():
    _CHECKPOINTS.clear()
    yield
    _CHECKPOINTS.clear()
