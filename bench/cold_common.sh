# Shared by bench/cold_imports.sh and bench/cold_profile.sh (sourced): the checkpoint, a bytecode
# cache warm for every run, ours and the import floor as argv arrays, and drop (empty the page cache).
set -u
ck=${CK:-/tmp/llama7b}
pyc=$(mktemp -d)
export PYTHONPYCACHEPREFIX=$pyc HF_HUB_OFFLINE=1
ours=(-m pipeline "checkpoint.path=$ck" quantization=none "memory.max_memory={0: 120GiB}"
  quantization.unquantized_dtype=null stages.validate.metrics.perplexity=false
  stages.validate.metrics.reference=false stages.validate.max_new_tokens=0 stages.load_shards.progress=false)
floor=(bench/whole_process.py --floor cuda --quant none)
drop() { python3 -c "import sys; sys.path.insert(0, 'bench'); import whole_process as w; assert w.drop_caches(['$ck'])"; }
