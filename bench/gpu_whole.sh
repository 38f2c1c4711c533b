#!/usr/bin/env bash
# Issue 16 on the GPU host, one command: the 7B-shaped bf16 checkpoint on local disk, the
# pread->pinned->H2D limit against our streamer (bench/h2d_limit.py), then whole processes
# (bench/whole_process.py: import floor, ours, transformers; bf16/int8/nf4) warm, then cold
# page cache and an empty bytecode cache while the time budget lasts. Results under $OUT.
set -u
ck=/tmp/llama7b
start=$(date +%s)
budget=${BUDGET:-540}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $OUT/machine.txt
python3 -c "import torch, transformers, accelerate, safetensors, bitsandbytes; print(torch.__version__, transformers.__version__, accelerate.__version__, safetensors.__version__, bitsandbytes.__version__)" >> $OUT/machine.txt 2>&1
python3 -c "import sys; sys.path.insert(0, '.'); from pipeline.checkpoint.synthetic import write_checkpoint; import time; t=time.time(); write_checkpoint('$ck', 'llama-7b'); print('checkpoint written in', round(time.time()-t,1), 's')" 2>&1 | tail -1 | tee -a $OUT/machine.txt
python3 bench/h2d_limit.py $ck $OUT/limit.json 2>&1 | tail -40 > $OUT/limit.log
tail -1 $OUT/limit.log
left=$(( budget - ($(date +%s) - start) ))
echo "whole-process budget ${left}s"
python3 bench/whole_process.py --suite gpu --dir $ck --quant none,int8,nf4 --rounds ${ROUNDS:-2} ${EXTRA:-} ${ONLY:+--only $ONLY} \
  --budget $left --timeout 200 --out $OUT/whole.json > $OUT/whole.log 2>&1
grep -v '^{' $OUT/whole.log | tail -40
