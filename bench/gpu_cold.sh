#!/usr/bin/env bash
# Issue 16, cold page cache on the GPU host, one command: the 7B-shaped checkpoint, one sequential
# read of its shards from a cold cache (the target's "one sequential read"), then whole processes
# (import floor, ours, transformers; bf16/int8/nf4) each after the shards are evicted. Under $OUT.
set -u
ck=/tmp/llama7b
python3 -c "import sys; sys.path.insert(0, '.'); from pipeline.checkpoint.synthetic import write_checkpoint; write_checkpoint('$ck', 'llama-7b')" 2>&1 | tail -1
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
python3 bench/whole_process.py --suite gpu --dir $ck --quant ${QUANT:-none,int8,nf4} --rounds 1 --cold --no-warm \
  --budget ${BUDGET:-420} --timeout 150 --out $OUT/cold.json > $OUT/cold.log 2>&1
grep -v '^{' $OUT/cold.log | tail -30
