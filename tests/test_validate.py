"""Each validation check passes on a good load and fails, naming the culprit, on a broken one."""

import dataclasses
import json
import re
import shutil

import pytest
import torch
from helpers import with_extra_tensor
from safetensors.torch import load_file, save_file

from pipeline import load
from pipeline.api import compose_config
from pipeline.engine.runner import bind_stages, start_context
from pipeline.errors import CheckFailed, UserError
from pipeline.stages.validate import CHECKS


def _loaded(path, tmp_path, *overrides):
    """A context after load_shards, and the bound validate stage: break the model in between."""
    cfg = compose_config([f"checkpoint.path={path}", "quantization=none", *overrides])
    stages = bind_stages(cfg)
    ctx = start_context(cfg, tmp_path)
    for _, stage in stages[:-1]:
        stage(ctx)
    return ctx, stages[-1][1]


def _fails(ctx, validate, check, culprit):
    with pytest.raises(CheckFailed, match=check):
        validate(ctx)
    v = ctx.report["validation"]
    assert v["checks"][check] is False
    assert culprit in v["failures"][check]
    return v


def test_a_good_load_passes_every_check(tiny, tmp_path):
    ctx, validate = _loaded(tiny("llama"), tmp_path, "stages.validate.checks.weights_finite=true")
    validate(ctx)
    assert ctx.report["validation"]["checks"] == {name: True for name in CHECKS}


def test_dtype_differs_from_plan(tiny, tmp_path):
    ctx, validate = _loaded(tiny("llama"), tmp_path)
    up = ctx.model.model.layers[1].mlp.up_proj
    up.weight = torch.nn.Parameter(up.weight.data.to(torch.float16), requires_grad=False)
    _fails(
        ctx,
        validate,
        "dtypes_as_planned",
        "model.layers.1.mlp.up_proj.weight (dtype torch.float16, planned torch.float32)",
    )


def test_shape_differs_from_plan(tiny, tmp_path):
    ctx, validate = _loaded(tiny("llama"), tmp_path)
    ctx.model.model.norm.weight = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    _fails(ctx, validate, "shapes_as_planned", "model.norm.weight")


def test_device_differs_from_plan(tiny, tmp_path):
    ctx, validate = _loaded(tiny("llama"), tmp_path)
    norm = ctx.plan.tensors["model.norm.weight"]
    ctx.plan.tensors["model.norm.weight"] = dataclasses.replace(norm, device="disk")  # plans are frozen: swap one in
    _fails(ctx, validate, "devices_as_planned", "model.norm.weight (device cpu, planned disk)")


def test_meta_tensor_left(tiny, tmp_path):
    ctx, validate = _loaded(tiny("llama"), tmp_path)
    ctx.model.model.norm.weight = torch.nn.Parameter(torch.empty(64, device="meta"), requires_grad=False)
    _fails(ctx, validate, "no_meta_tensors", "model.norm.weight")


def test_untied_weights(tiny, tmp_path):
    ctx, validate = _loaded(tiny("llama"), tmp_path, "stages.validate.checks.plan_matches_measured=false")
    m = ctx.model
    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.data.clone(), requires_grad=False)
    _fails(ctx, validate, "tied_weights_tied", "lm_head.weight")


def test_over_cap(tiny, tmp_path):
    ctx, validate = _loaded(tiny("llama"), tmp_path)
    ctx.plan.max_memory["cpu"] = 1000
    _fails(ctx, validate, "within_memory_caps", "cpu holds")


def test_measured_bytes_differ_from_plan(tiny, tmp_path):
    ctx, validate = _loaded(tiny("llama"), tmp_path)
    ctx.model.register_buffer("stray", torch.zeros(100_000))
    v = _fails(ctx, validate, "plan_matches_measured", "differ from the plan")
    assert v["plan_error"]["cpu"] > 0.5


def test_nan_forward(tiny, tmp_path):
    ctx, validate = _loaded(tiny("llama"), tmp_path)
    ctx.model.model.norm.weight.data[0] = float("nan")
    _fails(ctx, validate, "forward_finite", "NaN/Inf")


def test_nan_in_checkpoint_fails_the_nan_scan(tiny, tmp_path):
    dest = tmp_path / "ck"
    shutil.copytree(tiny("llama"), dest)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    shard = dest / index["weight_map"]["model.layers.2.self_attn.o_proj.weight"]
    tensors = load_file(shard)
    tensors["model.layers.2.self_attn.o_proj.weight"][3, 3] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckFailed, match="weights_finite: NaN/Inf in: model.layers.2.self_attn.o_proj.weight") as exc:
        load(
            [f"checkpoint.path={dest}", "quantization=none", "stages.validate.checks.weights_finite=true"],
            run_dir=tmp_path / "run",
        )
    assert exc.value.result.report["status"] == "failed"


def test_checks_can_be_switched_off(tiny, tmp_path):
    dest = with_extra_tensor(tiny("gpt2"), tmp_path / "ck")
    with pytest.raises(CheckFailed, match="all_checkpoint_tensors_used"):
        load([f"checkpoint.path={dest}"], run_dir=tmp_path / "on")
    result = load(
        [f"checkpoint.path={dest}", "stages.validate.checks.all_checkpoint_tensors_used=false"],
        run_dir=tmp_path / "off",
    )
    assert result.report["status"] == "ok"
    assert "all_checkpoint_tensors_used" not in result.report["validation"]["checks"]
    assert result.report["load"]["unexpected_keys"] == ["extra.weight"]  # still reported, just not a failure


def test_unknown_check_name(tiny, tmp_path):
    with pytest.raises(UserError, match=r"stages.validate.checks.colour: unknown check"):
        load([f"checkpoint.path={tiny('llama')}", "+stages.validate.checks.colour=true"], run_dir=tmp_path / "run")


@pytest.mark.parametrize("arch", ["llama", "t5", "bloom"])
def test_int8_reference_metrics(arch, tiny, tmp_path):
    r = load([f"checkpoint.path={tiny(arch)}", "quantization=int8"], run_dir=tmp_path / "run").report
    m = r["validation"]["metrics"]
    assert m["reference"].startswith("unquantized, streamed")
    assert 0 < m["logits_rel_error"] < 0.1
    if arch == "t5":
        assert m["output_cosine_to_reference"] > 0.99


def _progress(log_text: str, step: str) -> list[tuple[int, int, str]]:
    """(done, total, tail) of every progress line of one step of validate in run.log."""
    found = re.findall(rf"validate {step}: \w+ (\d+)/(\d+), [\d.]+ s, (.+)", log_text)
    return [(int(d), int(t), tail) for d, t, tail in found]


def test_long_steps_of_validate_log_their_progress(tiny, tmp_path):
    """Reference and perplexity count layers, greedy text counts tokens; interval 0 logs every step."""
    from test_metric_cache import _tokenizer  # the real byte-level tokenizer those tests save beside the weights

    ck = tmp_path / "ck"
    shutil.copytree(tiny("llama"), ck)
    _tokenizer(ck)
    overrides = [f"checkpoint.path={ck}", "quantization=int8", "stages.validate.max_eval_tokens=32"]
    load(
        [*overrides, "stages.validate.progress_interval=0", "stages.validate.max_new_tokens=4"], run_dir=tmp_path / "a"
    )
    text = (tmp_path / "a" / "run.log").read_text()
    assert _progress(text, "perplexity") == [(1, 3, _eta(text, "perplexity", 0)), (2, 3, _eta(text, "perplexity", 1)),
                                             (3, 3, "done")]  # fmt: skip
    reference = _progress(text, "reference")  # the tiny Llama's 3 layers: fixed inputs' forward, then the text's
    assert [(d, t) for d, t, _ in reference] == [(d, 6) for d in range(1, 7)] and reference[-1][2] == "done"
    greedy = _progress(text, "greedy")
    assert [(d, t) for d, t, _ in greedy] == [(d, 4) for d in range(1, len(greedy) + 1)]
    assert greedy[-1][2] in ("done", "done (stopped early)")
    # Steps shorter than the interval: the first line and the last, nothing between.
    load([*overrides, "stages.validate.progress_interval=3600"], run_dir=tmp_path / "b")
    text = (tmp_path / "b" / "run.log").read_text()
    assert _progress(text, "reference") == [(1, 6, _eta(text, "reference", 0)), (6, 6, "done")]
    assert [d for d, *_ in _progress(text, "perplexity")] == [1, 3]


def _eta(text: str, step: str, line: int) -> str:
    """The tail of a progress line that is not the last: an ETA in seconds."""
    tail = _progress(text, step)[line][2]
    assert re.fullmatch(r"ETA [\d.]+ s", tail), tail
    return tail


def test_a_negative_progress_interval_is_a_user_error(tiny, tmp_path):
    with pytest.raises(UserError, match=r"stages.validate.progress_interval: -1.0 .* give a number >= 0"):
        load([f"checkpoint.path={tiny('llama')}", "stages.validate.progress_interval=-1.0"], run_dir=tmp_path / "r")
