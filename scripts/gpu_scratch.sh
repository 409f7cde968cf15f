#!/usr/bin/env bash
# Issue 27 on a lent H200 (device tool; carry .whl: pydantic for pitlm's configs, liger-kernel, litgpt):
#   phase 1: the 1 B recipe's model at seq 2048, batch 8: pitlm's eager reference, pitlm's fast path (compile:
#            blocks + fused AdamW) and the plain transformers + torch.compile + fused AdamW baseline, one process,
#            the same weights and batches; then the 200-step bf16 loss-curve GPU test; then litgpt's pretraining
#            loop on the same shape
#   phase 2: the fast path's levers: SDPA backend (flash / cudnn), micro-batch 16; the 150 M recipe's model
#   phase 3: the GPU test; the 1 B model at micro-batch 16: pitlm's fast path, the baseline, litgpt
#   phase 4: (one H100, nvidia-h100-x1; carry .whl: pydantic) the 1 B model at micro-batch 8 and 16, pitlm's fast
#            path and the baseline; then the GPU test
#   phase 5: (one GPU) the recipe as a user runs it: `pitlm train --recipe scratch-pit-1b` with schedule=chronological
#            on a generated nested corpus (3 yearly cutoffs; model.vocab_size=65536 keeps the recipe's 1,074 M
#            parameters), its summary (mfu) and members; then one rank of FSDP2 (fsdp.force) with compile: blocks
#   phase 6: (one GPU) one rank's cost of FSDP2 and of compile under it: the 1 B recipe at micro-batch 8 x 2, 20 steps,
#            unsharded with compile: blocks, FSDP2 with compile: blocks, FSDP2 eager (log lines every 4 steps);
#            written 2026-12-07, not run yet (no machine started for it that day)
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
elif [ "$1" = 4 ]; then  # an H100's figures: the bench first (the GPU's state as found), then the GPU test
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv,noheader
  python3 -c "import sys, pydantic; print('python', sys.version.split()[0], 'pydantic', pydantic.VERSION)"
  bench b5.txt ${T1:-400} --arch pit-1b --batch 8,16 --path pitlm,baseline
  timeout ${T2:-120} python3 -m pytest -q -s -p no:cacheprovider tests/test_train_scratch.py -k gpu > "$OUT/tests.txt" 2>&1
  echo "[tests rc $?]"; grep -E "loss ref|passed|failed|Error" "$OUT/tests.txt" | tail -4
elif [ "$1" = 5 ]; then
  P="python3 -m pitlm.cli"; H=$PITLM_HOME; tkeys="^(val_loss_final|train_loss_final|peak_vram_mb|tokens_per_second|mfu|achieved_tflops_per_gpu|peak_tflops|training_seconds|steps|world_size|schedule|members|member_cutoffs|total_params|final_dir|Error|error):"
  python3 -c "from pitlm.corpus.fake import fake_records, write_parquet
write_parquet(fake_records(${DOCS:-24000}, seed=0, words=(100, 400)), '/tmp/gen-src/a.parquet', row_group_size=2000)"
  { $P corpus tokenizer gen --source /tmp/gen-src --cutoff 2016-12-31 --vocab-size 4096 &&
    $P corpus build gen --source /tmp/gen-src --cutoffs 2016-12-31,2017-12-31,2018-12-31 --tokenizer pit:gen \
      --val-fraction 0.05 --workers 8; } > "$OUT/corpus.txt" 2>&1; echo "[corpus rc $?]"; tail -3 "$OUT/corpus.txt"
  S="--set corpus=gen --set tokenizer=pit:gen --set model.vocab_size=65536 --set optim.warmup_steps=2 --set log_every=2"
  S="$S --set eval.batches=2 --set checkpoint.keep_last=1"
  timeout ${T1:-330} $P train --recipe scratch-pit-1b --name pit1b-chrono $S --set schedule=chronological \
    --set chronological.steps_per_period=${PER:-6} > "$OUT/chrono.txt" 2>&1; echo "[chrono rc $?]"
  grep -E "$tkeys|segment|member|val_loss|step .*tok/s" "$OUT/chrono.txt" | tail -30
  find $H/models/pit1b-chrono -maxdepth 3 \( -name member.json -o -name model.safetensors \) -exec ls -la {} +
  timeout ${T2:-90} python3 - <<'PY' 2>&1 | tail -5
import json, os, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from pitlm.train.paths import resolve_model_path
from pitlm.volume import Volume
vol = Volume(os.environ["PITLM_HOME"])
tokens = torch.randint(0, 4096, (2, 257), device="cuda")
for cutoff in ("2016-12-31", "2017-12-31", "2018-12-31"):
    path = resolve_model_path(f"model:pit1b-chrono@{cutoff}", vol)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    loss = m(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss.item()
    rec = json.loads((Path(path).parent / "member.json").read_text())
    print("member", cutoff, path, "params", sum(p.numel() for p in m.parameters()), "loss on random tokens", round(loss, 3), rec)
    del m
PY
  rm -rf $H/models/pit1b-chrono
  timeout ${T3:-200} $P train --recipe scratch-pit-1b --name pit1b-fsdp1 $S --set fsdp.force=true --set steps=6 \
    --set batch_size=16 --set grad_accum_steps=2 > "$OUT/fsdp1.txt" 2>&1; echo "[fsdp1 rc $?]"
  grep -E "$tkeys|fsdp|FSDP|compile|step .*tok/s|val_loss|Traceback" "$OUT/fsdp1.txt" | tail -20
elif [ "$1" = 6 ]; then
  P="python3 -m pitlm.cli"; H=$PITLM_HOME; export COLUMNS=250  # one log line per step line
  python3 -c "from pitlm.corpus.fake import fake_records, write_parquet
write_parquet(fake_records(6000, seed=0, words=(100, 400)), '/tmp/gen-src/a.parquet', row_group_size=2000)"
  { $P corpus tokenizer gen --source /tmp/gen-src --cutoff 2018-12-31 --vocab-size 4096 &&
    $P corpus build gen --source /tmp/gen-src --cutoff 2018-12-31 --tokenizer pit:gen --val-fraction 0.05 --workers 8; } \
    > "$OUT/corpus.txt" 2>&1; echo "[corpus rc $?]"
  S="--set corpus=gen --set tokenizer=pit:gen --set model.vocab_size=65536 --set optim.warmup_steps=2 --set log_every=4"
  S="$S --set eval.batches=1 --set checkpoint.keep_last=1 --set steps=20 --set batch_size=16 --set grad_accum_steps=2"
  for v in "plain-blocks fsdp.force=false compile=blocks" "fsdp-blocks fsdp.force=true compile=blocks" \
           "fsdp-eager fsdp.force=true compile=none"; do
    set -- $v
    timeout ${T1:-150} $P train --recipe scratch-pit-1b --name $1 $S --set $2 --set $3 --set fsdp.merge_on_exit=false \
      > "$OUT/$1.txt" 2>&1; echo "[$1 rc $?]"
    grep -oE "step +[0-9]+/20 .*tok/s|^(tokens_per_second|peak_vram_mb|mfu|train_loss_final):.*" "$OUT/$1.txt" \
      | tr -s ' ' | paste -sd' '
    rm -rf $H/models/$1
  done
fi
