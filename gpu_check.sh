#!/usr/bin/env bash
# Everything a short GPU session should measure, in order of priority, within one time budget:
#   bash gpu_check.sh [seconds, default 420]        results in $OUT (default out/gpu_check)
# Each part runs for at most its cap and what is left of the budget; parts that do not fit are skipped and say so.
# With 420 s, training + the CUDA tests + sampling may take it all (caps 180 + 100 + 120): the later parts run only
# where those finish early. The e2e run (python e2e.py config/e2e_gpu.py, ~10 minutes) needs a session of its own.
budget=${1:-420}
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
end=$(( $(date +%s) + budget ))

part() {  # part NAME MIN CAP COMMAND...: run COMMAND if MIN seconds are left, for at most CAP of them (a slow part
    # must not eat the budget of the ones after it), log to $OUT/NAME.log
    local name=$1 need=$2 cap=$3; shift 3
    local left=$(( end - $(date +%s) ))
    if (( left < need )); then
        echo "== $name: skipped ($left s left, needs ~$need)" | tee -a "$OUT/summary.txt"
        return
    fi
    (( left > cap )) && left=$cap
    echo "== $name (at most $left s): $*" | tee -a "$OUT/summary.txt"
    local t0=$(date +%s)
    timeout "$left" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc $rc, $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log"
}

{ date -u; git rev-parse --short HEAD; git status --short | head; nvidia-smi --query-gpu=name,driver_version,memory.total \
  --format=csv,noheader; python -c 'import torch, sys; print(sys.version.split()[0], torch.__version__)'; } \
  > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
# issue #3: training tokens/s and MFU of the mdlm and sdtt steps, and the sdtt step against its parts
part train 120 180 python bench.py --latency=False --hf_baseline=False --ar_baseline=False --out_file="$OUT/bench.jsonl"
# the CUDA-only tests: no host-device sync in the hot loops, flash attention, compiled == eager in bf16, the KV cache.
# No -x: one tolerance miss must not hide the rest. A machine without pytest (and without internet) uses .gpu_deps,
# made beforehand where PyPI is reachable and carried along (pytest imports pygments and packaging too):
#   pip install --target .gpu_deps --no-deps pytest pluggy iniconfig pygments packaging
with_pytest=()
python -c 'import pytest' 2>/dev/null || with_pytest=(env "PYTHONPATH=$PWD/.gpu_deps")
part tests 60 100 "${with_pytest[@]}" python -m pytest -q -p no:cacheprovider tests/test_gpu.py
# issue #6: sampling latency at 16/32/64 steps, and the project's causal DiT with its KV cache
part sample 90 120 python bench.py --train=False --batch_sizes="(1,8)" --sample_steps="(16,32,64)" --hf_baseline=False \
    --out_file="$OUT/bench.jsonl"
# the same sampling with the output layer everywhere (as the H100 table of the first session): the head-only gain
part sample_full_logits 60 90 python bench.py --train=False --batch_sizes="(1,8)" --sample_steps="(16,32,64)" \
    --hf_baseline=False --ar_baseline=False --head_only=False --out_file="$OUT/bench.jsonl"
# batch 1 is launch-bound: CUDA graphs, possible since the sampler never syncs per step
part sample_graphs 60 90 python bench.py --train=False --batch_sizes="(1,)" --sample_steps="(32,)" --hf_baseline=False \
    --ar_baseline=False --compile_mode=reduce-overhead --out_file="$OUT/bench.jsonl"
part train_autotune 200 600 python bench.py --latency=False --hf_baseline=False --ar_baseline=False \
    --train_compile_mode=max-autotune-no-cudagraphs --out_file="$OUT/bench.jsonl"
echo "results: $OUT (bench.jsonl, *.log, summary.txt)"
