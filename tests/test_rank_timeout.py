"""Tensor parallel: a rank that stops answering ends every rank with one line within parallel.timeout_s.

Real gloo process groups: two processes joined through our own group code where one sleeps before a
collective, and the user's torchrun command where one rank is stopped (SIGSTOP) while it loads.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, run_cli
from packaging.version import Version

from pipeline.hf import installed
from pipeline.hf.tensor_parallel import OLDEST_WITH_API
from pipeline.parallel.spec import ParallelSpec

SLEEPER = """
import sys, time
from pipeline.parallel.group import broadcast, ensure_group, lost_rank
from pipeline.parallel.spec import ParallelSpec
spec = ParallelSpec.from_config({"mode": "tensor", "device": "cpu", "timeout_s": 2}, dry_run=False)
ensure_group(spec)
if spec.rank == 1:
    time.sleep(7)  # stops answering: rank 0 is already waiting in the broadcast below
start = time.monotonic()
try:
    broadcast("run dir", spec)
except RuntimeError as exc:
    print(f"{time.monotonic() - start:.1f} {lost_rank(exc, spec)}")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_default_timeout_is_a_minute_and_bad_values_are_exit_2(tmp_path):
    assert ParallelSpec.from_config({"mode": "tensor"}, dry_run=True).timeout_s == 60
    p = run_cli(
        "parallel=tensor", "parallel.timeout_s=0", "stages=[instantiate_empty,plan]", f"hydra.run.dir={tmp_path}"
    )
    assert p.returncode == 2
    assert p.stderr.strip() == "error: parallel.timeout_s: 0 is not a positive number of seconds; give e.g. 60"


def test_a_rank_that_sleeps_before_a_collective_ends_both_ranks(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SLEEPER], cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in (0, 1)
    ]  # fmt: skip
    outs = [p.communicate(timeout=60) for p in procs]
    waited, _, line0 = outs[0][0].strip().partition(" ")
    assert 2 <= float(waited) < 6, outs  # rank 0 gave up after parallel.timeout_s, not after 600 s
    assert line0 == (
        "parallel: rank 0 waited 2 s (parallel.timeout_s) for another rank that did not answer (hung, stopped or "
        "died); see rank 0's run.log and run.rank<N>.log in the run directory, or raise parallel.timeout_s if a "
        "rank needs longer"
    )
    line1 = outs[1][0].strip().partition(" ")[2]
    assert line1.startswith("parallel: rank 1 lost another rank, which ended or was stopped mid-run"), outs


def _rank_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (their RANK environment variable)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
                found[int(env["RANK"])] = int(entry.name)
        except (OSError, KeyError, ValueError):
            continue
    return found


@pytest.mark.skipif(Version(installed()) < Version(OLDEST_WITH_API), reason="parallel=tensor needs the TP API")
def test_torchrun_a_stopped_rank_ends_every_rank_with_one_line(tiny, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MODEL_LOADER_METRICS_CACHE": "off"}
    env.pop("PIPELINE_DEBUG", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "pipeline"]
    cmd += ["checkpoint=hf_dir", f"checkpoint.path={tiny('llama')}", "parallel=tensor", "parallel.timeout_s=5"]
    proc = subprocess.Popen(
        [*cmd, f"hydra.run.dir={run}"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while "stage plan" not in _text(run / "run.rank1.log") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    ranks = _rank_pids(proc.pid)
    os.kill(ranks[1], signal.SIGSTOP)  # rank 1 stops answering from here on
    stopped = time.monotonic()
    while _alive(ranks[0]) and time.monotonic() - stopped < 60:
        time.sleep(0.1)
    ended = time.monotonic() - stopped
    os.kill(ranks[1], signal.SIGCONT)  # torchrun's SIGTERM to it is pending: it ends now
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and ended < 30, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith("error: parallel: rank 0 waited 5 s (parallel.timeout_s) for another rank"), err[-3000:]
    # rank 1, once continued: torchrun's SIGTERM, or the connection rank 0 closed, whichever it meets first
    assert errors[1].startswith(("error: interrupted by SIGTERM", "error: parallel: rank 1 lost another rank")), err
    assert len(errors) == 2 and f"{REPO / 'pipeline'}/" not in err  # no traceback of ours (torchrun prints its own)
    report = __import__("json").loads((run / "report.json").read_text())
    assert report["status"] == "error" and report["error"] == errors[0].removeprefix("error: ")


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
