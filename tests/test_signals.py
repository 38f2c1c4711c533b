"""Real signals to a real CLI process while it loads: SIGTERM (Slurm, torchrun, kill) and SIGINT (Ctrl-C) leave
report.json with status `interrupted`, and the process exits 128 + the signal; a sweep stops with its summary."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow
EXPECTED = [(signal.SIGTERM, 143), (signal.SIGINT, 130)]
# validate runs for many seconds after "stage validate" is logged, however fast the machine: a signal sent on
# that line lands inside it (validate of the default model alone took 1.5 s, and a busy test process once
# polled the log too late: the signal came as the process was ending, and it exited 0). The perplexity of 8192
# tokens of a long text (seconds even on a fast CPU); greedy text would stop at the model's end of sequence.
LONG_TEXT = (Path(__file__).resolve().parents[1] / "pipeline" / "data" / "eval.txt").read_text() * 24


def _long_validate(tmp_path: Path) -> list[str]:
    text = tmp_path / "long.txt"
    text.write_text(LONG_TEXT)
    return [f"stages.validate.eval_text={text}", "stages.validate.max_eval_tokens=8192"]


def _start(*args: str, cwd: Path = REPO) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MODEL_LOADER_METRICS_CACHE": "off"}
    env.pop("PIPELINE_DEBUG", None)
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_when(proc: subprocess.Popen, log: Path, line: str, signum: int, timeout: float = 300) -> None:
    """Send `signum` as soon as `log` holds `line` (the stage has started); validate runs for seconds after it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and line in log.read_text():
            proc.send_signal(signum)
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"{line!r} never appeared in {log}: {proc.communicate()[1][-2000:]}")


@pytest.mark.parametrize("signum, code", EXPECTED, ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_a_stage_leaves_the_report(signum, code, tmp_path):
    run = tmp_path / "run"
    proc = _start(
        sys.executable, "-m", "pipeline", "quantization=none", *_long_validate(tmp_path), f"hydra.run.dir={run}"
    )
    _signal_when(proc, run / "run.log", "stage validate", signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    name = signal.Signals(signum).name
    line = f"interrupted by {name} during stage validate (stages done: instantiate_empty, plan, quantize, load_shards)"
    assert err.strip().splitlines()[-1] == f"error: {line}" and "Traceback" not in err
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "interrupted" and report["error"] == line
    assert [(s["name"], s["status"]) for s in report["stages"]] == [
        ("instantiate_empty", "ok"), ("plan", "ok"), ("quantize", "ok"), ("load_shards", "ok"), ("validate", "interrupted")
    ]  # fmt: skip


SCRIPT = """
import sys
from pipeline import load
from pipeline.errors import Interrupted
try:
    load(["quantization=none", *sys.argv[2:]], run_dir=sys.argv[1])
except Interrupted as exc:
    r = exc.result
    print(exc.signal_name, exc.exit_code, r.report["status"], type(r.model).__name__, r.run_dir == __import__("pathlib").Path(sys.argv[1]))
"""


def test_python_load_raises_interrupted_with_the_result(tmp_path):
    run = tmp_path / "run"
    proc = _start(sys.executable, "-c", SCRIPT, str(run))
    _signal_when(proc, run / "run.log", "stage validate", signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert out.split() == ["SIGTERM", "143", "interrupted", "LlamaForCausalLM", "True"]
    assert json.loads((run / "report.json").read_text())["status"] == "interrupted"


def test_a_signal_stops_a_sweep_and_its_summary_is_written(tmp_path):
    root = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "-m",
        "quantization.threshold=0.0,6.0,8.0",
        f"hydra.sweep.dir={root}",
    ]
    proc = _start(*cmd)
    _signal_when(proc, root / "1" / "run.log", "stage validate", signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    with open(root / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["quantization.threshold"], r["status"]) for r in rows] == [("0.0", "ok"), ("6.0", "interrupted")]
    assert not (root / "2").exists()  # the sweep stopped: no job after the interrupted one


def test_sigterm_while_the_cli_starts_is_one_line_and_143(tiny, tmp_path):
    """Before any stage (Hydra has made the run directory, torch is being imported): no report yet, one line."""
    run = tmp_path / "run"
    proc = _start(sys.executable, "-m", "pipeline", f"checkpoint.path={tiny('llama')}", f"hydra.run.dir={run}")
    _signal_when(proc, run / ".hydra" / "config.yaml", "checkpoint", signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: interrupted by SIGTERM") and "Traceback" not in err


def test_a_signal_wrapped_by_the_interpreter_is_still_the_signal():
    """Python 3.11 wraps an exception raised while a class body is set up (a dataclass field's __set_name__)
    in RuntimeError; a SIGTERM landing there, during an import, is still SIGTERM (exit 143), not a traceback."""
    import signal

    from pipeline.engine.signals import interruption_in
    from pipeline.errors import Interrupted

    class Field:
        def __set_name__(self, owner, name):
            raise Interrupted(signal.SIGTERM)

    with pytest.raises(BaseException) as info:

        class Owner:  # noqa: B903
            field = Field()

    found = interruption_in(info.value)
    assert isinstance(found, Interrupted) and found.exit_code == 143
    assert interruption_in(RuntimeError("no signal here")) is None
