#!/usr/bin/env bash
# Issue 27 on a lent H200 (device tool; carry .whl: pydantic for pitlm's configs, liger-kernel, litgpt):
#   phase 1: the 1 B recipe's model at seq 2048, batch 8: pitlm's eager reference, pitlm's fast path (compile:
#            blocks + fused AdamW) and the plain transformers + torch.compile + fused AdamW baseline, one process,
#            the same weights and batches; then the 200-step bf16 loss-curve GPU test; then litgpt's pretraining
#            loop on the same shape
#   phase 2: the fast path's levers: SDPA backend (flash / cudnn), micro-batch 16; the 150 M recipe's model
#   phase 3: the GPU test; the 1 B model at micro-batch 16: pitlm's fast path, the baseline, litgpt
# Usage: bash scripts/gpu_scratch.sh 1    (logs in $OUT/*.txt; the last lines summarise)
source scripts/gpu_env.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
B="python3 -m pitlm.cli bench train --mode scratch --seq 2048 --steps ${STEPS:-10} --warmup ${WARMUP:-4}"
keys="^(path|sdpa|batch|tokens_per_second|mfu|mfu_attn_unhalved|achieved_tflops|peak_allocated_mib|peak_reserved_mib|warmup_seconds|loss_first|loss_last|error):"
bench() {  # bench LOG TIMEOUT ARGS...
  local log=$1 t=$2; shift 2
  timeout "$t" $B "$@" > "$OUT/$log" 2>&1; echo "[$log rc $?]"; grep -E "$keys" "$OUT/$log" | paste -sd' ' | sed 's/ path:/\npath:/g'
}
if [ "$1" = 1 ]; then
  bench b1.txt ${T1:-330} --arch pit-1b --batch 8 --path reference,pitlm,baseline
  timeout ${T2:-110} python3 -m pytest -q -s -p no:cacheprovider tests/test_train_scratch.py -k gpu > "$OUT/tests.txt" 2>&1
  echo "[tests rc $?]"; grep -E "loss ref|passed|failed|Error" "$OUT/tests.txt" | tail -4
  timeout ${T3:-120} python3 scripts/litgpt_pretrain_bench.py --arch pit-1b --seq 2048 --batch 8 --steps 10 \
    --warmup 4 > "$OUT/litgpt.txt" 2>&1; echo "[litgpt rc $?]"; grep -E "$keys|Error" "$OUT/litgpt.txt" | paste -sd' '
elif [ "$1" = 2 ]; then
  timeout ${T0:-80} python3 -m pytest -q -s -p no:cacheprovider tests/test_train_scratch.py -k gpu > "$OUT/tests.txt" 2>&1
  echo "[tests rc $?]"; grep -E "loss ref|passed|failed|Error" "$OUT/tests.txt" | tail -4
  bench b2.txt ${T1:-250} --arch pit-1b --batch 8,16 --path pitlm --sdpa cudnn,flash
  bench b3.txt ${T2:-200} --arch pit-150m --batch 16,32 --path pitlm,baseline
elif [ "$1" = 3 ]; then  # the GPU test again, then the 1 B recipe's micro-batch 16 on all three peers
  timeout ${T0:-80} python3 -m pytest -q -s -p no:cacheprovider tests/test_train_scratch.py -k gpu > "$OUT/tests.txt" 2>&1
  echo "[tests rc $?]"; grep -E "loss ref|passed|failed|Error" "$OUT/tests.txt" | tail -4
  bench b4.txt ${T1:-200} --arch pit-1b --batch 16 --path pitlm,baseline
  timeout ${T3:-120} python3 scripts/litgpt_pretrain_bench.py --arch pit-1b --seq 2048 --batch 16 --steps 10 \
    --warmup 4 > "$OUT/litgpt16.txt" 2>&1; echo "[litgpt rc $?]"; grep -E "$keys|Error" "$OUT/litgpt16.txt" | paste -sd' '
fi
