"""Hydra multirun sweeps in a subprocess: summary at the sweep root, failed jobs kept, threshold reuse, joblib."""

import csv
import json

import pytest
from helpers import run_cli

pytestmark = pytest.mark.slow


def _rows(root):
    with open(root / "summary.csv") as fh:
        return list(csv.DictReader(fh))


def test_threshold_sweep_on_the_default_model(tmp_path):
    root = tmp_path / "sweep"
    p = run_cli("-m", "quantization.threshold=0.0,2.0,6.0", f"hydra.sweep.dir={root}")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _rows(root)
    assert [r["quantization.threshold"] for r in rows] == ["0.0", "2.0", "6.0"]
    assert all(
        r["status"] == "ok" and float(r["perplexity"]) > 0 and float(r["reference_perplexity"]) > 0 for r in rows
    )
    assert [r["reused_load_from"] for r in rows] == ["", "0", "0"]  # one load, three validations
    assert list(root.glob("*.png")) and (root / "summary.md").read_text().count("\n") == 5
    # Reuse is safe: the reused model at threshold 6 measures exactly what a fresh load does.
    single = tmp_path / "single"
    p = run_cli("quantization.threshold=6.0", f"hydra.run.dir={single}")
    fresh = json.loads((single / "report.json").read_text())["validation"]["metrics"]
    assert float(rows[2]["perplexity"]) == fresh["perplexity"]
    assert float(rows[2]["logits_rel_error"]) == fresh["logits_rel_error"]


def test_a_failing_job_is_a_row_and_the_sweep_goes_on(tiny, tmp_path):
    root = tmp_path / "sweep"
    p = run_cli("-m", f"checkpoint.path={tiny('bloom')},{tmp_path / 'missing'}", f"hydra.sweep.dir={root}")
    assert p.returncode == 1, p.stderr[-3000:]  # the summary is written, then the sweep says a job failed
    assert p.stderr.strip().splitlines()[-1] == f"error: 1 sweep job(s) did not end ok; see {root}/summary.md"
    rows = _rows(root)
    assert len(rows) == 2
    assert sorted(r["status"] for r in rows) == ["error", "ok"]
    failed = next(r for r in rows if r["status"] == "error")
    assert "does not exist" in failed["error"] and "missing" in failed["overrides"]


def test_sweeping_checkpoint_path_of_hf_dir_without_a_name(tiny, tmp_path):
    """The sweep root is named before checkpoint.path is set; every job lands under it, whatever path it loads."""
    paths = [tiny("llama"), tiny("gpt2"), tmp_path / "missing"]
    p = run_cli("-m", "checkpoint=hf_dir", "checkpoint.path=" + ",".join(map(str, paths)), cwd=tmp_path)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    (root,) = (tmp_path / "runs" / "checkpoint" / "multirun").iterdir()
    rows = _rows(root)
    assert [(r["checkpoint.path"], r["status"]) for r in rows] == [
        (str(paths[0]), "ok"), (str(paths[1]), "ok"), (str(paths[2]), "error")
    ]  # fmt: skip
    assert sorted(d.name for d in root.iterdir() if d.is_dir()) == ["0", "1", "2"]
    assert json.loads((root / "1" / "report.json").read_text())["checkpoint"]["path"] == str(paths[1])


def test_ready_memory_sweep_with_a_cap_too_small(tmp_path):
    root = tmp_path / "sweep"
    p = run_cli("+sweep=memory", f"hydra.sweep.dir={root}")  # auto, cpu_4gib, cpu_64mib on the default model
    assert p.returncode == 1, p.stderr[-3000:]  # one job failed: the sweep's exit says so
    rows = _rows(root)
    assert [(r["memory"], r["status"]) for r in rows] == [("auto", "ok"), ("cpu_4gib", "ok"), ("cpu_64mib", "error")]
    assert "memory.max_memory.cpu" in rows[2]["error"] and "missing" in rows[2]["error"]
    assert (root / "load_and_memory_vs_memory.png").exists()


def test_joblib_launcher_runs_jobs_in_parallel_processes(tiny, tmp_path):
    root = tmp_path / "sweep"
    p = run_cli(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"checkpoint.path={tiny('llama')}",
        "quantization.threshold=0.0,6.0",
        f"hydra.sweep.dir={root}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _rows(root)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert [r["reused_load_from"] for r in rows] == ["", ""]  # separate processes share no model


def test_optuna_finds_the_lowest_memory_within_the_quality_bound(tiny, tmp_path):
    import yaml

    root = tmp_path / "sweep"
    p = run_cli(
        "+sweep=optuna_memory",
        f"checkpoint.path={tiny('llama')}",
        "~sweep_objective.max_perplexity_ratio",
        "+sweep_objective.max_logits_rel_error=0.05",
        "hydra.sweeper.n_trials=4",
        f"hydra.sweep.dir={root}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _rows(root)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    within = [
        int(r["bytes_cpu"]) / 2**30 for r in rows if r["quantization"] == "none" or float(r["logits_rel_error"]) <= 0.05
    ]
    best = yaml.safe_load((root / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(within))


def _tiny_sweep(tiny, tmp_path, env=None):
    """A real multirun over two checkpoints (one missing) x two thresholds: 2 ok jobs, 2 failed, no tokenizer."""
    root = tmp_path / "sweep"
    p = run_cli(
        "-m",
        f"checkpoint.path={tiny('llama')},{tmp_path / 'missing'}",
        "quantization=int8",
        "quantization.threshold=0.0,6.0",
        f"hydra.sweep.dir={root}",
        env=env,
    )
    assert p.returncode == 1, p.stderr[-3000:]  # the two jobs of the missing checkpoint
    return root, p


def test_without_matplotlib_the_sweep_says_no_plots_and_writes_none(tiny, tmp_path):
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    root, p = _tiny_sweep(tiny, tmp_path, env={"PYTHONPATH": str(shadow.parent)})
    said = [line for line in p.stdout.splitlines() if line.startswith("sweep summary:")]
    assert said == [
        f"sweep summary: {root / 'summary.csv'}, {root / 'summary.md'}; "
        "no plots: matplotlib is not installed (pip install matplotlib)"
    ]
    assert "plots in" not in p.stdout + p.stderr
    assert not list(root.glob("*.png")) and len(_rows(root)) == 4


def test_plots_join_only_runs_that_differ_in_the_swept_key(tiny, tmp_path):
    """One line per setting of the other keys; failed jobs an x at the axes' edge, never a value of 0; no tokenizer:
    the logits error is the quality plot."""
    from pipeline.sweeps.plots import FAILED_Y, draw
    from pipeline.sweeps.summary import collect_rows, swept_keys

    root, p = _tiny_sweep(tiny, tmp_path)
    assert f"sweep summary: {root / 'summary.csv'}, {root / 'summary.md'} and 5 plot(s) in {root}" in p.stdout
    assert sorted(f.name for f in root.glob("*.png")) == sorted(
        ["frontier.png"]
        + [
            f"{kind}_vs_{key}.png"
            for kind in ("load_and_memory", "logits_error")
            for key in ("checkpoint_path", "quantization_threshold")
        ]
    )  # no tokenizer: no perplexity (quality_vs_*) plot, and the frontier is the logits' error
    rows = collect_rows(root)
    figures = dict(draw(rows, swept_keys(rows), ["bytes_cpu"]))
    (ax,) = figures["logits_error_vs_quantization_threshold"].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    llama = f"checkpoint.path={tiny('llama').name}"
    assert set(lines) == {llama, "failed job (no value)"}  # the missing checkpoint's jobs have no line of their own
    assert list(lines[llama].get_xdata()) == [0.0, 6.0] and all(0 < y < 0.1 for y in lines[llama].get_ydata())
    failed = lines["failed job (no value)"]
    assert list(failed.get_xdata()) == [0.0, 6.0] and list(failed.get_ydata()) == [FAILED_Y, FAILED_Y]
    assert failed.get_transform() == ax.get_xaxis_transform()  # axes coordinates: the bottom edge, not y=0
    assert [t.get_text() for t in ax.texts] == ["failed", "failed"]
    memory = figures["load_and_memory_vs_checkpoint_path"].axes[1]
    by_threshold = {line.get_label(): line for line in memory.get_lines()}
    assert set(by_threshold) == {"cpu, quantization.threshold=0.0", "cpu, quantization.threshold=6.0",
                                 "failed job (no value)"}  # fmt: skip
    assert all(len(by_threshold[k].get_xdata()) == 1 for k in by_threshold if k.startswith("cpu"))
    (front,) = figures["frontier"].axes
    assert front.get_title().startswith("logits' relative error vs the unquantized reference")
    (line,) = [line for line in front.get_lines() if line.get_label() == f"int8, {llama}"]
    errors = sorted(r["logits_rel_error"] for r in rows if r["status"] == "ok")
    assert sorted(line.get_ydata()) == errors  # the two thresholds of the one checkpoint, joined
    assert any("failed (2, not drawn)" in t.get_text() for t in figures["frontier"].texts)
