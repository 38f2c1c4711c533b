"""Cluster launchers run for real: submitit's local executor and a local Ray cluster.

submitit_local goes through the same path as Slurm (the launcher pickled to a job folder,
a fresh Python process per job, the JobReturn pickled back); the Ray launcher is ours
(hydra_plugins/model_loader_ray) on a real local cluster. Both must leave the usual summary
at the sweep root, with the job whose caps are too small a row with its error.
"""

from __future__ import annotations

import csv
import json
import pickle
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import run_cli

from pipeline.api import compose_config

# A memory sweep on the tiny Llama (180 KiB in int8): 64 KiB cannot hold it.
SWEEP = ["memory=cpu_4gib", "memory.max_memory.cpu=4GiB,64KiB"]


def _rows(root: Path) -> list[dict]:
    with open(root / "summary.csv") as fh:
        return list(csv.DictReader(fh))


def _check_summary(root: Path) -> list[dict]:
    rows = _rows(root)
    assert [(r["memory.max_memory.cpu"], r["status"]) for r in rows] == [("4GiB", "ok"), ("64KiB", "error")]
    assert "memory.max_memory.cpu" in rows[1]["error"] and "missing" in rows[1]["error"]
    assert int(rows[0]["bytes_cpu"]) > 0 and float(rows[0]["logits_rel_error"]) < 0.05
    assert [r["reused_load_from"] for r in rows] == ["", ""]  # every job in its own process: nothing to reuse
    assert (root / "summary.md").read_text().count("\n") == 4
    assert (root / "load_and_memory_vs_memory_max_memory_cpu.png").stat().st_size > 0
    return rows


def test_slurm_preset_takes_partition_gpus_and_time_as_overrides():
    cfg = compose_config(
        [
            "hydra/launcher=slurm_gpu",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.timeout_min=120",
        ]
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 4, 120)
    assert (launcher.tasks_per_node, launcher.cpus_per_task, launcher.mem_gb) == (1, 8, 64)
    assert compose_config(["hydra/launcher=slurm_gpu"]).hydra.launcher.gpus_per_node == 1


def test_ray_launcher_config_defaults():
    cfg = compose_config(["hydra/launcher=ray", "hydra.launcher.ray.init.address=auto"]).hydra.launcher
    assert cfg._target_ == "hydra_plugins.model_loader_ray.launcher.RayLauncher"
    assert cfg.ray.init.address == "auto"
    assert (cfg.ray.remote.max_calls, cfg.ray.remote.max_retries, cfg.ray.remote.num_cpus) == (1, 0, 1)


@pytest.mark.slow
def test_memory_sweep_through_submitit_local(tiny, tmp_path):
    root = tmp_path / "sweep"
    p = run_cli(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        f"checkpoint.path={tiny('llama')}",
        *SWEEP,
        f"hydra.sweep.dir={root}",
        timeout=400,
    )
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-3000:]  # the 64KiB job failed: the sweep says so
    _check_summary(root)
    # The jobs ran in submitit's processes (their output is in the job folders, not here);
    # the summary callback ran in the submitting process, after collecting their results.
    assert "sweep summary:" in p.stdout and "status: OK" not in p.stdout
    folders = sorted(d for d in (root / ".submitit").iterdir() if list(d.glob("*_result.pkl")))
    assert len(folders) == 2
    outcomes = []
    for folder in folders:
        (result,) = folder.glob("*_result.pkl")
        state, job_return = pickle.loads(result.read_bytes())
        assert state == "success"
        outcomes.append((job_return.hydra_cfg.hydra.job.num, job_return.status.name, job_return.return_value))
        log = next(folder.glob("*_log.out")).read_text()
        assert f"run: {root / str(job_return.hydra_cfg.hydra.job.num)}" in log
    assert sorted(outcomes) == [(0, "COMPLETED", "ok"), (1, "COMPLETED", "error")]


def _ray_processes(temp_dir: str) -> list[int]:
    """Live processes of the Ray cluster whose session lives under temp_dir (gcs_server, raylet, workers)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_memory_sweep_through_a_local_ray_cluster(tiny, tmp_path):
    root = tmp_path / "sweep"
    # Short: Ray puts Unix sockets under it (at most 107 characters).
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        _ray_sweep(tiny, root, temp_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_sweep(tiny, root: Path, temp_dir: str) -> None:
    p = run_cli(
        "-m",
        "hydra/launcher=ray",
        "+hydra.launcher.ray.init.num_cpus=2",
        f"+hydra.launcher.ray.init._temp_dir={temp_dir}",
        f"checkpoint.path={tiny('llama')}",
        *SWEEP,
        f"hydra.sweep.dir={root}",
        timeout=400,
    )
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-3000:]  # the 64KiB job failed: the sweep says so
    _check_summary(root)
    out = p.stdout + p.stderr
    assert "Ray launcher: 2 jobs" in out and "(_run_job pid=" in out  # the jobs ran in Ray workers
    assert list(Path(temp_dir).glob("session_*")), "the cluster did not run under the given temp dir"
    assert _ray_processes(temp_dir) == [], "the local Ray cluster outlived the sweep"


@pytest.mark.slow
def test_threshold_reuse_stays_within_one_ray_worker(tiny, tmp_path):
    """Reuse is per process: with kept workers (max_calls=0) on one CPU, both jobs run in one worker."""
    root = tmp_path / "sweep"
    p = run_cli(
        "-m",
        "hydra/launcher=ray",
        "+hydra.launcher.ray.init.num_cpus=1",
        "hydra.launcher.ray.remote.max_calls=0",
        f"checkpoint.path={tiny('llama')}",
        "quantization.threshold=0.0,6.0",
        f"hydra.sweep.dir={root}",
        timeout=400,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = _rows(root)
    assert [(r["status"], r["reused_load_from"]) for r in rows] == [("ok", ""), ("ok", "0")]
    report = json.loads((root / "1" / "report.json").read_text())
    assert report["quantization"]["threshold"] == 6.0 and report["quantization"]["reused_from"] == str(root / "0")
    assert [s["name"] for s in report["stages"] if s.get("reused")] == [
        "instantiate_empty",
        "plan",
        "quantize",
        "load_shards",
    ]


def test_ray_address_without_a_cluster_is_one_line_and_exit_2(tiny, tmp_path):
    empty = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # no ray_current_cluster file: no cluster to join
    try:
        p = run_cli(
            "-m",
            "hydra/launcher=ray",
            "hydra.launcher.ray.init.address=auto",
            f"+hydra.launcher.ray.init._temp_dir={empty}",
            f"checkpoint.path={tiny('llama')}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        )
    finally:
        shutil.rmtree(empty, ignore_errors=True)
    assert p.returncode == 2, p.stderr[-3000:]
    # One line of ours; Hydra adds its own hint (HYDRA_FULL_ERROR) under it.
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("hydra.launcher.ray.init (address='auto'): ") and "ray start --head" in lines[0]
