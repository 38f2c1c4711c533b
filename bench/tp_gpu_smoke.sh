#!/usr/bin/env bash
# Tensor parallel on a GPU host with NCCL: one rank per GPU. On a one-GPU host this is world
# size 1, which still runs the NCCL group, the device mesh on cuda, the slices read into GPU
# memory and transformers' hooks; with more GPUs it is the real thing (NPROC=<gpus>).
# Families: tiny Llama and Mixtral (fused experts) from tests/architectures.py. Results in $OUT.
set -u
nproc=${NPROC:-$(nvidia-smi -L | wc -l)}
python3 - <<'PY'
import sys; sys.path.insert(0, "tests")
from pathlib import Path
from architectures import BY_FAMILY, build
for fam in ("llama", "mixtral"):
    build(BY_FAMILY[fam], Path(f"/tmp/tp_{fam}"))
PY
for fam in llama mixtral; do
  for q in none int8; do
    run=$OUT/${fam}_${q}
    torchrun --nproc_per_node $nproc -m pipeline checkpoint=hf_dir checkpoint.path=/tmp/tp_$fam parallel=tensor \
      quantization=$q hydra.run.dir=$run > $OUT/${fam}_${q}.log 2>&1
    echo "$fam $q rc=$? $(grep -E '^error|tensor parallel: |logits vs' $OUT/${fam}_${q}.log | tr '\n' ' ')"
  done
done
