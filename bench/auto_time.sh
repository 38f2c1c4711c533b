#!/usr/bin/env bash
# quantization=auto against the default job, whole processes (issue 32: at most 3x its first run), 3 rounds
# alternating; every first run with an empty metric cache of its own. Usage: bash bench/auto_time.sh
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
for i in 1 2 3; do
rm -rf /tmp/tcd$i /tmp/tca$i
s=$(date +%s.%N); MODEL_LOADER_METRICS_CACHE=/tmp/tcd$i .venv/bin/python -m pipeline hydra.run.dir=/tmp/td_$i > /tmp/td_$i.log 2>&1; echo "default_first $i $? $(echo "$(date +%s.%N) - $s" | bc)"
s=$(date +%s.%N); MODEL_LOADER_METRICS_CACHE=/tmp/tca$i .venv/bin/python -m pipeline quantization=auto hydra.run.dir=/tmp/ta_$i > /tmp/ta_$i.log 2>&1; echo "auto_first $i $? $(echo "$(date +%s.%N) - $s" | bc)"
s=$(date +%s.%N); MODEL_LOADER_METRICS_CACHE=/tmp/tca$i .venv/bin/python -m pipeline quantization=auto hydra.run.dir=/tmp/tb_$i > /tmp/tb_$i.log 2>&1; echo "auto_repeated $i $? $(echo "$(date +%s.%N) - $s" | bc)"
uptime
done
