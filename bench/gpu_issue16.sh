#!/usr/bin/env bash
# Issue 16 on the GPU host, one command per part (PART=cold, ab or warm), results under $OUT.
#   cold: machine and versions; the 7B-shaped bf16 checkpoint; one sequential read of its shards
#         from a cold cache; the pread->pinned->H2D limit against our streamer, alternating
#         (bench/h2d_limit.py, QUICK=0 for the full grid, PAIRS pairs, medians); whole processes (floor, ours, transformers;
#         bf16/int8/nf4) each after the page cache is emptied.
#   ab:   cold, bf16: floor, ours, ours under ALT_ENV and/or ALT_OVERRIDES (an A/B of one setting), ROUNDS rounds.
#   warm: the same checkpoint; whole processes warm (ROUNDS rounds, alternating), and the CUDA
#         context micro-benchmark (bench/cuda_context_overlap.py).
set -u
ck=/tmp/llama7b
start=$(date +%s)
budget=${BUDGET:-540}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $OUT/machine.txt
python3 -c "import torch, transformers, accelerate, safetensors, bitsandbytes; print(torch.__version__, transformers.__version__, accelerate.__version__, safetensors.__version__, bitsandbytes.__version__)" >> $OUT/machine.txt 2>&1
for d in /sys/block/*/queue; do echo "$d read_ahead_kb=$(cat $d/read_ahead_kb) max_sectors_kb=$(cat $d/max_sectors_kb)"; done >> $OUT/machine.txt 2>/dev/null
df -h /tmp | tail -1 >> $OUT/machine.txt
python3 -c "import sys; sys.path.insert(0, '.'); from pipeline.checkpoint.synthetic import write_checkpoint; import time; t=time.time(); write_checkpoint('$ck', 'llama-7b'); print('checkpoint written in', round(time.time()-t,1), 's')" 2>&1 | tail -1 | tee -a $OUT/machine.txt
cat /sys/block/*/queue/scheduler >> $OUT/machine.txt 2>/dev/null
if [ "${PART:-cold}" = ab ]; then  # cold page cache: ours against ours under ALT_ENV (VAR=value ...), bf16
python3 bench/whole_process.py --suite gpu --dir $ck --quant none --rounds ${ROUNDS:-2} --cold --no-warm --only floor_none,ours_none,ours_none_alt \
  --alt-env "${ALT_ENV:-}" --alt-overrides "${ALT_OVERRIDES:-}" --budget $(( budget - ($(date +%s) - start) )) --timeout 150 --out $OUT/cold_ab.json > $OUT/cold_ab.log 2>&1
grep -v '^{' $OUT/cold_ab.log | tail -12
elif [ "${PART:-cold}" = cold ]; then
python3 - <<PY | tee $OUT/seq_read.json
import json, sys, time
sys.path.insert(0, "bench")
import whole_process as w
from pathlib import Path
ok = w.drop_caches(["$ck"])
t = time.perf_counter(); n = 0
for f in sorted(Path("$ck").glob("*.safetensors")):
    with open(f, "rb", buffering=0) as fh:
        while chunk := fh.read(64 << 20):
            n += len(chunk)
s = time.perf_counter() - t
print(json.dumps({"evicted": ok, "sequential_read_s": round(s, 3), "bytes": n, "gb_per_s": round(n / s / 1e9, 2)}))
PY
QUICK=${QUICK:-1} PAIRS=${PAIRS:-5} python3 bench/h2d_limit.py $ck $OUT/limit.json > $OUT/limit.log 2>&1
tail -1 $OUT/limit.log
left=$(( budget - ($(date +%s) - start) ))
echo "cold whole-process budget ${left}s"
python3 bench/whole_process.py --suite gpu --dir $ck --quant ${QUANT:-none,int8,nf4} --rounds 1 --cold --no-warm \
  --budget $left --timeout 150 --out $OUT/cold.json > $OUT/cold.log 2>&1
grep -v '^{' $OUT/cold.log | tail -30
else
python3 bench/cuda_context_overlap.py --rounds ${CTX_ROUNDS:-2} --out $OUT/cuda_context.json 2>&1 | tail -8
left=$(( budget - ($(date +%s) - start) ))
echo "warm whole-process budget ${left}s"
python3 bench/whole_process.py --suite gpu --dir $ck --quant ${QUANT:-none,int8,nf4} --rounds ${ROUNDS:-2} \
  --budget $left --timeout 150 --out $OUT/warm.json > $OUT/warm.log 2>&1
grep -v '^{' $OUT/warm.log | tail -30
fi
