#!/usr/bin/env bash
# The tested range: build a venv from the lock with one package moved, and run the suites that
# build on that package's internals in it.
#
#   bash scripts/compat.sh transformers==5.17.0      # the oldest transformers pyproject.toml allows
#   bash scripts/compat.sh transformers==5.25.0      # the newest release (pip index versions transformers);
#                                                    # a locked version runs in .venv itself
#
# The venv is .venv-compat/<name>-<version> (made once, reused). Locked packages stay at their locked
# versions; only when pip cannot resolve that does the script release, in this order, the moved
# package's own requirements, then the locked packages that require it, and it prints every version
# that differs from the lock. The last line is a row for docs/compatibility.md.
main() {
  set -uo pipefail
  cd "$(dirname "$0")/.."
  local spec=${1:?usage: scripts/compat.sh NAME==VERSION [pytest args...]}
  shift
  local name=${spec%%==*}
  local venv=.venv-compat/${name}-${spec#*==} released=""
  local suites=(tests/test_environment.py tests/test_hf_adapter.py tests/test_conformance.py
                tests/test_prequantized.py tests/test_save.py tests/test_tensor_parallel.py)
  [ $# -gt 0 ] && suites=("$@")
  mkdir -p "$venv"
  local log=$venv/compat.log
  : > "$log"
  if grep -qix "$spec" constraints.txt; then  # the locked version itself: the lock's own venv
    bash scripts/setup.sh
    venv=.venv
  elif ! released=$(.venv/bin/python scripts/compat_build.py "$venv" "$spec" 2>>"$log"); then
    echo "compat: could not build $venv for $spec (see $log)" >&2
    tail -5 "$log" >&2
    return 2
  fi
  echo "compat: $spec in $venv; released from the lock: ${released:-none}" >&2
  MODEL_LOADER_LOCK_MOVED="$released" "$venv/bin/python" -m pytest -q -p no:cacheprovider "${suites[@]}" 2>&1 \
    | tee -a "$log" | tail -25
  local rc=${PIPESTATUS[0]}
  local summary
  summary=$(grep -E "^[0-9]+ (passed|failed)|^=+ .*(passed|failed)" "$log" | tail -1 | tr -d '=')
  echo "| $spec | $(date -u +%F) | ${summary# } | ${released:-none} |"
  [ "$rc" -eq 5 ] && return 1
  return "$rc"
}
main "$@"
exit $?
