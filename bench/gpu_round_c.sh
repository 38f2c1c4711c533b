#!/usr/bin/env bash
# Issue 5 on the GPU: correctness of nf4/fp4 and offloaded int8 (gpu_checks), then the 7B
# checkpoint with most layers on the CPU (offload_7b). Writes under $OUT.
set -u
python3 bench/gpu_checks.py 2>&1 | tee $OUT/gpu_checks.log | grep -E '^\{|Error|error' | tail -30
ck=/tmp/llama7b
python3 -c "import sys; sys.path.insert(0, '.'); from pipeline.checkpoint.synthetic import write_checkpoint; import os; os.path.isdir('$ck') or write_checkpoint('$ck', 'llama-7b')" 2>&1 | tail -2
python3 bench/offload_7b.py $ck 4GiB 2>&1 | tee $OUT/offload_7b.log | grep -E '^\{|Error' | tail -5
