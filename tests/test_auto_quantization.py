"""Mixed precision (issue 32): per-module methods in one plan, measured sensitivities, quantization=auto."""

import pytest
import torch

from pipeline import load
from pipeline.errors import UserError
from pipeline.quant.bnb import import_bitsandbytes


def _classes(model) -> dict[str, str]:
    bnb = import_bitsandbytes()
    kinds = {bnb.nn.Linear8bitLt: "int8", bnb.nn.Linear4bit: "4bit"}
    return {n: kinds[type(m)] for n, m in model.named_modules() if type(m) in kinds}


def test_mixed_methods_load_exactly(tiny, tmp_path):
    """int8, nf4 and kept modules side by side: each module is its method's class, the plan is exact."""
    r = load(
        [
            f"checkpoint.path={tiny('llama')}",
            "quantization=int8",
            "quantization.methods={mlp: nf4, o_proj: keep}",
            "quantization.compute_dtype=fp32",
        ],
        run_dir=tmp_path / "r",
    )
    assert r.report["status"] == "ok"
    classes = _classes(r.model)
    assert {n for n, k in classes.items() if k == "4bit"} == {
        f"model.layers.{i}.mlp.{p}" for i in range(3) for p in ("gate_proj", "up_proj", "down_proj")
    }
    assert {n for n, k in classes.items() if k == "int8"} == {
        f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "k_proj", "v_proj")
    }
    assert not any(n.endswith("o_proj") for n in classes)
    for name, module in r.model.named_modules():
        if name in classes and classes[name] == "4bit":
            assert module.weight.quant_type == "nf4" and module.compute_dtype == torch.float32
    q = r.report["quantization"]
    assert q["methods"]["model.layers.0.mlp.up_proj"] == "nf4"
    assert q["methods"]["model.layers.0.self_attn.q_proj"] == "int8"
    assert q["skipped_reasons"]["model.layers.1.self_attn.o_proj"] == "methods pattern 'o_proj': keep"
    v = r.report["validation"]
    assert all(v["checks"].values()) and v["plan_error"] == {"cpu": 0.0}
    assert v["measured_bytes"] == r.report["plan"]["predicted_bytes"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["quantization.methods={mlp: int4}"],
            r"^quantization\.methods\.mlp: 'int4'; choose one of int8, nf4, fp4, keep$",
        ),
        (["quantization=none", "quantization.methods={mlp: nf4}"], r"^quantization\.methods: per-module methods need"),
    ],
)
def test_bad_methods_are_exit_2(overrides, match, tiny, tmp_path):
    with pytest.raises(UserError, match=match):
        load([f"checkpoint.path={tiny('llama')}", "+experiment=dry_run", *overrides], run_dir=tmp_path / "r")


@pytest.fixture
def ck(tiny, tmp_path):
    """The tiny Llama with a real byte-level tokenizer: the budget's perplexity can be measured."""
    import shutil

    from test_metric_cache import _tokenizer

    dest = tmp_path / "ck"
    shutil.copytree(tiny("llama"), dest)
    _tokenizer(dest)
    return dest


def test_auto_meets_its_budget_and_says_how(ck, tmp_path, monkeypatch):
    """quantization=auto: every module's method and sensitivity reported, each module its method's class, plan
    error 0, the confirmed perplexity within the budget; a second run takes the sensitivities from the cache."""
    monkeypatch.setenv("MODEL_LOADER_METRICS_CACHE", str(tmp_path / "cache"))
    args = [f"checkpoint.path={ck}", "quantization=auto", "quantization.budget=2%", "quantization.compute_dtype=fp32"]
    r = load(args, run_dir=tmp_path / "r")
    assert r.report["status"] == "ok"
    auto = r.report["auto"]
    assert set(auto["modules"]) == {f"model.layers.{i}.{p}" for i in range(3) for p in _LINEARS}
    assert auto["confirmed_perplexity"] <= auto["reference_perplexity"] * 1.02
    assert sum(auto["counts"].values()) == 21 and auto["sensitivities_cached"] is False
    classes = _classes(r.model)
    for name, entry in auto["modules"].items():
        assert set(entry["sensitivity"]) == {"int8", "nf4"}
        assert classes.get(name, "keep") == {"nf4": "4bit"}.get(entry["method"], entry["method"])
    v = r.report["validation"]
    assert v["plan_error"] == {"cpu": 0.0} and all(v["checks"].values())
    again = load(args, run_dir=tmp_path / "r2")
    assert again.report["auto"]["sensitivities_cached"] is True
    assert again.report["auto"]["modules"] == auto["modules"]


def test_auto_takes_the_smallest_measured_plan_within_the_budget(trained, tmp_path):
    """The bisection along the greedy's plans: the chosen plan is the smallest of those measured within the
    budget, every smaller plan measured missed it, and validate measures the loaded model at that figure."""
    r, ppl = _ppl(trained, tmp_path, "auto", "quantization=auto", "quantization.budget=0.5%")
    a = r.report["auto"]
    within = [x for x in a["rounds"] if x["measured"] <= a["reference_perplexity"] * 1.005]
    chosen = min(within, key=lambda x: x["bytes"], default=None)
    if chosen is None:  # no quantized plan measured within: every module kept, the reference itself
        assert a["counts"]["keep"] == 21 and a["confirmed_perplexity"] == a["reference_perplexity"]
    else:
        assert (a["chosen_plan"], a["confirmed_perplexity"]) == (chosen["plan"], chosen["measured"])
        assert all(
            x["measured"] > a["reference_perplexity"] * 1.005 for x in a["rounds"] if x["bytes"] < chosen["bytes"]
        )
    assert len(a["rounds"]) <= 8 + 3  # the scan, then bisection below the first plan within (43 plans)
    assert ppl == a["confirmed_perplexity"]  # the simulation is the loaded model's figure


_LINEARS = [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
_LINEARS += [f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["quantization=auto", "quantization.budget=abc"], r"^quantization\.budget: 'abc' is not a perplexity"),
        (["quantization=auto", "quantization.budget=null"], r"^quantization\.budget: quantization=auto needs"),
        (["quantization=int8", "quantization.budget=1%"], r"^quantization\.budget: '1%' is for quantization=auto"),
    ],
)
def test_bad_budgets_are_exit_2(overrides, match, tiny, tmp_path):
    with pytest.raises(UserError, match=match):
        load([f"checkpoint.path={tiny('llama')}", "+experiment=dry_run", *overrides], run_dir=tmp_path / "r")


def test_auto_without_a_tokenizer_is_exit_2(tiny, tmp_path):
    with pytest.raises(UserError, match=r"^quantization=auto: the budget is a perplexity on the evaluation text"):
        load([f"checkpoint.path={tiny('llama')}", "quantization=auto"], run_dir=tmp_path / "r")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny Llama trained on the evaluation text until it predicts it well (loss about 1.8): quantization
    error shows in its perplexity (a random model's perplexity is the vocabulary's, whatever the weights)."""
    from helpers import make_checkpoint
    from test_metric_cache import _tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.measure import quality

    src, dest = tmp_path_factory.mktemp("untrained"), tmp_path_factory.mktemp("trained")
    make_checkpoint("llama", src)
    _tokenizer(src)
    tokenizer = AutoTokenizer.from_pretrained(src)
    ids = tokenizer(quality.eval_text(None), return_tensors="pt").input_ids[:, :512]
    model = AutoModelForCausalLM.from_pretrained(src)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(80):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(dest, max_shard_size=200_000)
    tokenizer.save_pretrained(dest)
    return dest


def _ppl(ck, tmp_path, name, *args):
    r = load([f"checkpoint.path={ck}", "quantization.compute_dtype=fp32", *args], run_dir=tmp_path / name)
    assert r.report["status"] == "ok" and all(r.report["validation"]["checks"].values())
    return r, r.report["validation"]["metrics"]["perplexity"]


def test_auto_under_caps_is_the_best_plan_that_fits(trained, tmp_path):
    """Caps that all-int8 (179.8 KiB) cannot meet and all-nf4 (144.0 KiB) can: auto without a quality budget
    fills the caps with the upgrades that buy the most perplexity per byte, and beats all-nf4."""
    _, nf4 = _ppl(trained, tmp_path, "nf4", "quantization=nf4")
    int8, _ = _ppl(trained, tmp_path, "int8", "quantization=int8")
    assert int8.report["plan"]["predicted_bytes"]["cpu"] > 170 * 1024
    caps = ["quantization=auto", "quantization.budget=null", "memory.max_memory={cpu: 170KiB}"]
    r, auto = _ppl(trained, tmp_path, "auto", *caps)
    a = r.report["auto"]
    assert a["caps"] is True and a["budget"] is None
    assert a["counts"]["nf4"] > 0 and a["counts"]["int8"] + a["counts"]["keep"] > 0
    assert 144 * 1024 < r.report["plan"]["predicted_bytes"]["cpu"] <= 170 * 1024
    assert r.report["validation"]["plan_error"] == {"cpu": 0.0}
    assert auto < nf4, (auto, nf4)
    assert a["confirmed_perplexity"] == a["rounds"][-1]["measured"]


def test_auto_budget_that_cannot_fit_the_caps_names_the_best_that_does(trained, tmp_path):
    with pytest.raises(UserError) as e:
        load(
            [
                f"checkpoint.path={trained}",
                "quantization=auto",
                "quantization.budget=0.1%",
                "quantization.compute_dtype=fp32",
                "memory.max_memory={cpu: 150KiB}",
            ],
            run_dir=tmp_path / "r",
        )
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("quantization.budget: no plan that fits memory.max_memory is within 0.10%; ")
    assert "the best that fits (" in message and "measures +" in message and message.endswith("or the caps")


def test_auto_with_caps_below_all_nf4_is_exit_2_at_plan_time(trained, tmp_path):
    with pytest.raises(UserError, match=r"^memory\.max_memory\.cpu: .* missing: .*; quantization=auto: not even every"):
        load(
            [
                f"checkpoint.path={trained}",
                "quantization=auto",
                "quantization.budget=null",
                "memory.max_memory={cpu: 100KiB}",
                "+experiment=dry_run",
            ],
            run_dir=tmp_path / "r",
        )


def test_auto_without_budget_or_caps_is_exit_2_before_any_measurement(trained, tmp_path):
    with pytest.raises(
        UserError, match=r"^quantization\.budget: quantization=auto needs a quality budget, memory caps"
    ):
        load([f"checkpoint.path={trained}", "quantization=auto", "quantization.budget=null"], run_dir=tmp_path / "r")


def test_frontier_sweep_draws_every_configuration_on_both_texts(trained, tmp_path):
    """+sweep=frontier as a user runs it: a real multirun over the shipped presets and one of the user's own
    (--config-dir) whose caps are too small. Every job measures the evaluation and the held-out text; auto meets
    its budget; frontier.png joins only points of one method, in order of size; the failed job is listed, not drawn."""
    from helpers import run_cli

    from pipeline.sweeps.plots import draw
    from pipeline.sweeps.summary import collect_rows, swept_keys

    own = tmp_path / "own" / "frontier"
    own.mkdir(parents=True)
    (own / "too_small.yaml").write_text("# @package _global_\nmemory:\n  max_memory: {cpu: 1KiB}\n")
    root = tmp_path / "sweep"
    points = "none,int8_t6,nf4,auto_1pct,auto_10pct,too_small"
    p = run_cli("--config-dir", str(own.parent), "-m", "+sweep=frontier", f"checkpoint.path={trained}",
                f"+frontier={points}", f"hydra.sweep.dir={root}")  # fmt: skip
    assert p.returncode == 1, p.stderr[-3000:]  # the too-small job
    assert (root / "frontier.png").exists()
    rows = {r["_swept"]["frontier"]: r for r in collect_rows(root)}
    assert [k for k, r in rows.items() if r["status"] != "ok"] == ["too_small"]
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert all(r["heldout_perplexity"] > 0 and r["reference_heldout_perplexity"] > 0 for r in ok)
    assert all(r["heldout_perplexity"] != r["perplexity"] for r in ok)  # two texts, two figures
    assert [rows[k]["method"] for k in ("none", "int8_t6", "nf4", "auto_1pct")] == ["none", "int8", "nf4", "auto"]
    for budget, key in ((0.01, "auto_1pct"), (0.10, "auto_10pct")):
        assert rows[key]["perplexity"] <= rows[key]["reference_perplexity"] * (1 + budget)
    size = lambda r: r["bytes_cpu"]  # noqa: E731
    assert size(rows["nf4"]) <= size(rows["auto_1pct"]) < size(rows["none"])
    figures = dict(draw(list(rows.values()), swept_keys(list(rows.values())), ["bytes_cpu"]))
    fig = figures["frontier"]
    assert [ax.get_title() for ax in fig.axes] == [
        "perplexity on the evaluation text",
        "perplexity on the held-out text",
    ]
    for ax, metric in zip(fig.axes, ("perplexity", "heldout_perplexity"), strict=True):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert {"none", "int8", "nf4", "auto"} <= set(lines)
        autos = sorted((size(rows[k]) / 2**20, rows[k][metric]) for k in ("auto_1pct", "auto_10pct"))
        assert list(zip(lines["auto"].get_xdata(), lines["auto"].get_ydata(), strict=True)) == autos
        assert all(min(line.get_ydata()) > 0 for line in lines.values())  # nothing drawn at 0
    assert any("too_small" in t.get_text() and t.get_color() == "red" for t in fig.texts)
