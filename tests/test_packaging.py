"""The package as pip users get it: a wheel built from the tree, installed into a fresh venv, run from elsewhere.

No network: the wheel is built with the test venv's setuptools (--no-build-isolation), installed with
--no-deps, and the fresh venv sees the test venv's packages through a .pth file (torch, Hydra...), but not
this checkout: `pipeline` and its configs come from the wheel alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest
from helpers import REPO, make_checkpoint

PLAN_ONLY = "stages=[instantiate_empty,plan]"


def _sh(*args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args}: {out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin dir of a fresh venv with the wheel installed, its environment)."""
    root = tmp_path_factory.mktemp("wheel")
    files = _sh("git", "ls-files", "-co", "--exclude-standard", cwd=REPO).stdout.split()
    src = root / "src"
    for name in files:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    _sh(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(root / "dist"),
        str(src),
    )
    (wheel,) = (root / "dist").glob("*.whl")
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    purelib = sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)})
    os.makedirs(purelib, exist_ok=True)
    with open(os.path.join(purelib, "test_venv_packages.pth"), "w") as pth:
        pth.write(sysconfig.get_path("purelib") + "\n")  # torch, Hydra...: not this checkout (editable finder unused)
    py = env_dir / "bin" / "python"
    _sh(str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIPELINE_DEBUG", "HYDRA_FULL_ERROR")}
    env["HF_HUB_OFFLINE"] = "1"
    return env_dir / "bin", env


def test_the_wheel_runs_from_another_directory(installed, tmp_path):
    bin_dir, env = installed
    where = _sh(
        str(bin_dir / "python"), "-c", "import pipeline.conf; print(pipeline.conf.__file__)", cwd=tmp_path, env=env
    )
    assert str(bin_dir.parent) in where.stdout and str(REPO) not in where.stdout
    ck = make_checkpoint("llama", tmp_path / "tiny")
    cli = str(bin_dir / "model-loader")
    _sh(cli, PLAN_ONLY, f"checkpoint.path={ck}", "quantization=none", "hydra.run.dir=dry", cwd=tmp_path, env=env)
    assert json.loads((tmp_path / "dry" / "report.json").read_text())["status"] == "ok"
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "__init__.py").write_text("")  # the project's own `conf` package
    (conf / "myjob.yaml").write_text(
        f"defaults:\n  - config\n  - override quantization: none\n  - _self_\n\ncheckpoint:\n  path: {ck}\n"
        "memory:\n  max_memory:\n    cpu: 1GiB\n"
    )
    args = ("--config-dir", str(conf), "--config-name", "myjob", PLAN_ONLY, "hydra.run.dir=mine")
    _sh(cli, *args, cwd=tmp_path, env=env)
    report = json.loads((tmp_path / "mine" / "report.json").read_text())
    assert report["status"] == "ok" and report["plan"]["max_memory"] == {"cpu": 2**30}
    typo = subprocess.run([cli, "+quantization.treshold=4"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert typo.returncode == 2 and typo.stderr.strip().splitlines() == [
        "error: quantization.treshold: unknown key; did you mean quantization.threshold?"
    ]
