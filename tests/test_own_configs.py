"""Your own config directory and the keyword form of load(), used from a directory outside the repository."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from helpers import REPO, make_checkpoint, run_cli

from pipeline import load
from pipeline.engine.compose import compose_config, keyword_overrides
from pipeline.errors import UserError

PLAN_ONLY = "stages=[instantiate_empty,plan]"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's project: a checkpoint, a conf/ of its own (a job and a checkpoint option), run from there."""
    ck = make_checkpoint("llama", tmp_path / "models" / "tiny")
    conf = tmp_path / "conf"
    (conf / "checkpoint").mkdir(parents=True)
    (conf / "checkpoint" / "tiny.yaml").write_text(f"defaults:\n  - _schema\n  - _self_\n\nname: tiny\npath: {ck}\n")
    (conf / "myjob.yaml").write_text(
        "defaults:\n  - config\n  - override checkpoint: tiny\n  - override quantization: none\n  - _self_\n\n"
        "memory:\n  max_memory:\n    cpu: 1GiB\n"
    )
    (conf / "__init__.py").write_text("")  # a project's own top-level `conf` package: never ours
    monkeypatch.chdir(tmp_path)
    assert os.path.commonpath([tmp_path, REPO]) != str(REPO)
    return tmp_path, conf, ck


def _plan(result) -> dict:
    return json.loads((result.run_dir / "plan.json").read_text())


def test_load_with_own_config_dir(project):
    root, conf, ck = project
    result = load([PLAN_ONLY, "dtype=bf16"], config_dir=conf, config_name="myjob", run_dir=root / "run")
    assert result.report["status"] == "ok"
    assert result.report["plan"]["max_memory"] == {"cpu": 2**30}
    assert _plan(result)["inputs"]["quantization"] == {"method": "none"}
    assert yaml.safe_load((root / "run" / ".hydra" / "overrides.yaml").read_text()) == [PLAN_ONLY, "dtype=bf16"]


def test_keyword_form_builds_the_same_config(project):
    root, _, ck = project
    keywords = dict(
        checkpoint=ck, dtype="bf16", max_memory={"cpu": "1GiB"}, quantization={"method": "int8", "threshold": 4.0}
    )
    by_keywords = compose_config([*keyword_overrides(keywords), PLAN_ONLY])
    by_hand = compose_config(
        ["checkpoint=hf_dir", f"checkpoint.path={ck}", "dtype=bf16", "memory.max_memory={cpu: 1GiB}",
         "quantization=int8", "quantization.threshold=4.0", PLAN_ONLY]
    )  # fmt: skip
    for cfg in (by_keywords, by_hand):
        del cfg.hydra
    assert by_keywords == by_hand
    result = load([PLAN_ONLY], run_dir=root / "kw", **keywords)
    assert result.report["status"] == "ok" and result.report["plan"]["max_memory"] == {"cpu": 2**30}
    assert _plan(result)["inputs"]["quantization"]["threshold"] == 4.0


def test_keyword_form_device_map_and_unknown_keyword(project):
    root, _, ck = project
    result = load([PLAN_ONLY], run_dir=root / "map", checkpoint=ck, device_map={"model": "cpu", "lm_head": "cpu"})
    assert set(result.report["plan"]["device_map"].values()) == {"cpu"}
    with pytest.raises(UserError, match=r"^load\(max_mem=\.\.\.\): unknown keyword; did you mean max_memory\?$"):
        load([PLAN_ONLY], checkpoint=ck, max_mem={"cpu": "1GiB"})


def test_cli_with_own_config_dir(project):
    root, conf, _ = project
    out = run_cli(
        "--config-dir", str(conf), "--config-name", "myjob", PLAN_ONLY, "hydra.run.dir=run", cwd=root, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((root / "run" / "report.json").read_text())
    assert report["status"] == "ok" and report["plan"]["max_memory"] == {"cpu": 2**30}


def test_a_projects_own_conf_package_does_not_shadow_ours(project):
    """`python -m` puts the working directory first on sys.path: its `conf` package is the project's, and
    composition still finds ours (pkg://pipeline.conf)."""
    root, _, ck = project
    out = run_cli(PLAN_ONLY, f"checkpoint.path={ck}", "quantization=none", "hydra.run.dir=plain", cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((root / "plain" / "report.json").read_text())["status"] == "ok"
