#!/usr/bin/env bash
# The second half of the GPU benchmark (the first: ours/transformers bf16 and int8, warm):
# reader tuning, the other peers warm, and cold-cache runs. Writes under $OUT.
set -u
ck=/tmp/llama7b
for t in 12 16; do for c in 16 64; do
  BENCH_OVERRIDES="stages.load_shards.threads=$t stages.load_shards.chunk_mib=$c stages.load_shards.staging_mib=$((c*2*t))" \
    python3 bench/load_bench.py --dir $ck --rounds 2 --methods ours_bf16 --timeout 120 2>&1 | grep '^| ours' | sed "s/^/threads=$t chunk=$c /"
done; done | tee $OUT/tuning.log
python3 bench/load_bench.py --dir $ck --rounds 3 --methods accelerate,st_cuda,st_cpu_to,read_seq --out $OUT/bench_b.json --timeout 150 2>&1 | tee $OUT/bench_b.log | grep -v '^{'
python3 bench/load_bench.py --dir $ck --rounds 1 --cold --methods ours_bf16,hf_bf16,read_seq,ours_int8 --out $OUT/bench_cold.json --timeout 150 2>&1 | tee $OUT/bench_cold.log | grep -v '^{'
