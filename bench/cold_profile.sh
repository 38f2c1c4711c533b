#!/usr/bin/env bash
# Why a cold-page-cache run of ours imports slower than the floor: one cold run of ours under
# cProfile (the main thread's 40 costliest functions), and transformers' import_utils self time
# cold in the floor, ours, and ours without read-ahead (python -X importtime). Results under $OUT.
#   CK=/tmp/llama7b bash bench/cold_profile.sh
source "$(dirname "$0")/cold_common.sh"
utils() {  # name, argv...: one cold run under -X importtime; its wall and import_utils' self seconds
  local name=$1; shift
  drop
  local t0=$EPOCHREALTIME
  python3 -X importtime "$@" > /dev/null 2> $pyc/imports.txt || true
  local wall=$(awk "BEGIN {printf \"%.2f\", $EPOCHREALTIME - $t0}")
  echo "$name wall=$wall $(grep 'transformers.utils.import_utils$' $pyc/imports.txt | sed 's/import time://' | awk -F'|' '{printf "import_utils_self_s=%.2f", $1/1e6}')" | tee -a $OUT/cold_profile.txt
}
python3 "${floor[@]}" > /dev/null 2>&1  # the bytecode cache, warm for all
python3 "${ours[@]}" hydra.run.dir=$pyc/prime > /dev/null 2>&1
utils floor "${floor[@]}"
utils ours "${ours[@]}" hydra.run.dir=$pyc/a
utils ours_noahead "${ours[@]}" hydra.run.dir=$pyc/b stages.load_shards.readahead=false
drop
python3 -m cProfile -o $pyc/prof.out "${ours[@]}" hydra.run.dir=$pyc/c > /dev/null 2>&1
python3 - "$pyc/prof.out" >> $OUT/cold_profile.txt <<'PY'
import pstats, sys
s = pstats.Stats(sys.argv[1])
s.sort_stats("tottime").print_stats(40)
s.print_callers("import_utils.py|metadata|find_spec")
PY
tail -60 $OUT/cold_profile.txt | cut -c1-160
