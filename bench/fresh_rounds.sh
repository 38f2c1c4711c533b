#!/usr/bin/env bash
# Fresh-process loads on the GPU host, alternating methods, with and without the kernel warm-up
# (bench/fresh_load.py). Needs the 7B-shaped checkpoint at $1. Writes $OUT/fresh.jsonl.
set -u
ck=$1
python3 bench/fresh_load.py $ck none > /dev/null 2>&1  # primes the bytecode cache and the page cache
for r in 1 2 3; do
  for m in none int8 nf4; do
    python3 bench/fresh_load.py $ck $m 2>/dev/null | tail -1 >> $OUT/fresh.jsonl
    [ $m != none ] && python3 bench/fresh_load.py $ck $m prewarm 2>/dev/null | tail -1 >> $OUT/fresh.jsonl
  done
done
cat $OUT/fresh.jsonl
