#!/usr/bin/env bash
# Issue 16 on the GPU host: cold page cache, ours with the import set read ahead against ours
# without (PIPELINE_IMPORT_READAHEAD=0), and the import floor, for QUANT (default none,int8).
set -u
ck=/tmp/llama7b
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/machine.txt
python3 -c "import torch, transformers, bitsandbytes; print(torch.__version__, transformers.__version__, bitsandbytes.__version__)" >> $OUT/machine.txt 2>&1
[ -d $ck ] || python3 -c "import sys; sys.path.insert(0, '.'); from pipeline.checkpoint.synthetic import write_checkpoint; write_checkpoint('$ck', 'llama-7b')"
only=""
for q in $(echo ${QUANT:-none,int8} | tr , ' '); do only="$only,floor_$q,ours_$q,ours_${q}_alt"; done
python3 bench/whole_process.py --suite gpu --dir $ck --quant ${QUANT:-none,int8} --rounds ${ROUNDS:-2} --cold --no-warm \
  --only ${only#,} --alt-env "PIPELINE_IMPORT_READAHEAD=0" --budget ${BUDGET:-450} --timeout 150 --out $OUT/cold_imports_ab.json > $OUT/cold_imports_ab.log 2>&1
grep -v '^{' $OUT/cold_imports_ab.log | tail -12
python3 - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/cold_imports_ab.json"))
for s in d["samples"]:
    if s["method"].startswith("ours"):
        ra = (s.get("read_ahead") or {})
        print(s["method"], s["wall_s"], s.get("stages"), "ckpt", ra.get("read_s"), ra.get("finished_before"), ra.get("yielded_s"), "imports", s.get("imports_read_ahead"))
PY
