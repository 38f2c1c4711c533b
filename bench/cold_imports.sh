#!/usr/bin/env bash
# Where a cold-page-cache run spends its time: the import floor and ours (read-ahead on and off),
# each once after the page cache is emptied, under `python -X importtime`; then the imports
# whose cumulative time grew most against the floor (bench/import_diff.py). Results under $OUT.
#   CK=/tmp/llama7b bash bench/cold_imports.sh
source "$(dirname "$0")/cold_common.sh"
timed() {  # name, argv...: one cold run, wall seconds and the import profile
  local name=$1; shift
  drop || { echo "cannot empty the page cache"; exit 1; }
  local t0=$EPOCHREALTIME
  python3 -X importtime "$@" > $OUT/$name.out 2> $OUT/imports_$name.txt || true
  echo "$name $(awk "BEGIN {printf \"%.2f\", $EPOCHREALTIME - $t0}")" | tee -a $OUT/cold_walls.txt
}
python3 "${floor[@]}" > /dev/null 2>&1  # the bytecode cache, warm for all
python3 "${ours[@]}" hydra.run.dir=$pyc/prime > /dev/null 2>&1
for round in 1 2; do
  timed floor_$round "${floor[@]}"
  timed ours_$round "${ours[@]}" hydra.run.dir=$pyc/run_ours_$round
  timed ours_noahead_$round "${ours[@]}" hydra.run.dir=$pyc/run_ours_noahead_$round stages.load_shards.readahead=false
  cp $pyc/run_ours_$round/report.json $OUT/report_ours_$round.json 2>/dev/null
  cp $pyc/run_ours_noahead_$round/report.json $OUT/report_ours_noahead_$round.json 2>/dev/null
done
python3 bench/import_diff.py $OUT/imports_floor_1.txt $OUT/imports_ours_1.txt > $OUT/import_diff.txt
head -40 $OUT/import_diff.txt
