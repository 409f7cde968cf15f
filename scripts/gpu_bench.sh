#!/usr/bin/env bash
# GPU measurements of issue 9 on a lent H100/H200 (device tool), in two calls while the machine is warm:
#   phase 1 (carry .whl .whl2): wheels -> /tmp/site; doctor; 35B LoRA baseline (torch DeltaNet fallback)
#   phase 2 (carry .whl3: z3 for tilelang): fla correctness vs reference; 35B LoRA with fla; embedding bench
#   phase 0 (carry .whl .whl2): wheels only, then phase 3 at once (carry .whl3 .whl4: z3 + bitsandbytes):
#           the full 40-layer model on one H100 with the memory levers (bf16 adapters, 8-bit AdamW); embedding
#           at larger batches
#   phase 4 (after 0, .whl3, .whl4 are installed): a profile of the fitting 40-layer step; LoRA without lm_head/
#           embed_tokens in full at batch 4 / 8; embedding at batch 1024
#   phase 5 (after 0; carry .whl3 .whl5: z3 + slim bitsandbytes): the grouped expert-LoRA path -- correctness
#           against peft's path (scripts/gpu_check_experts.py), then the 40-layer LoRA recipe with it
#   phase 6 (after 5, machine still warm): larger batches with the grouped path
#   phase 7 (after 0; carry .whl3 .whl5): batch 1 with the full target list, LoRA-only batch 6
#   phase 8 (several GPUs, after 0; carry .whl3): FSDP2 full-weight bench on all GPUs, then train -> sharded
#           checkpoint -> pitlm merge -> logits check (scripts/fsdp_merge_check.py)
#   phase 9 (after 0; carry .whl3 .whl5): fla's fused conv/norm kernels (pitlm.kernels) -- GPU correctness test,
#           embedding with them (profiled), the seed's recipe at batch 2 with them (profiled)
#   phase 10 (after 9, warm): larger batches with the full target list now that peft's frozen copies of
#           lm_head/embed_tokens share the trained storage
#   phase 11 (after 0; carry .whl3 .whl5): the kernel tests with their output; embedding with the grouped experts
#           forward added (no expert-parallel masks)
#   phase 12 (after 0; carry .whl3 .whl5): the kernel and expert tests alone, their output shown
#   phase 13 (after 0; carry .whl3 .whl5): where a batch-4 step of the seed's recipe goes now (profile), and
#           LoRA alone at batch 8 with the fused kernels
#   phase 14 (after 0; carry .whl3 .whl5): the expert-LoRA GPU test, then the seed's recipe at batch 4 (session 4
#           also timed a fused LoRA-linear option here, removed after it measured no gain)
#   phase 15 (carry .whl: the one-archive site of scripts/pack_gpu_site.sh): the optimizer step inside backward --
#           GPU test against the ordinary 8-bit step, then the seed's recipe swept over batch x in_backward under an
#           H100's memory (--memory-cap-gib 79.0 on an H200), one model; then the H200's own memory
#   phase 16 (carry .whl): the 8-bit AdamW step alone, bitsandbytes' vs pitlm's (no sync per tensor), on the
#           recipe's trainable tensors; the bitwise GPU test first. No model forward, so no fla autotuning: ~2 min
#   phase 17 (carry .whl, and .kcache when an earlier call saved one): GPU tests of liger's fused linear CE, the
#           gather-only MoE permutation, stochastic rounding; the seed's recipe at batch 8 under an H100's memory,
#           profiled; saves the kernel caches to $OUT/kcache.tar.xz (carry them next time as .kcache/)
#   phase 18 (right after 17, warm): A/B arm without liger, LoRA alone under 74 GB, uncheckpointed layers on the H200
#   phase 19 (carry .whl .kcache): LoRA alone at batch 2-6 under 74 GB; uncheckpointed layers under an H100's 80 GB
#   phase 20 (carry .whl .kcache): GPU tests of the liger-under-autocast fix and of offloaded checkpointing; the
#           seed's recipe under an H100's memory with liger's loss now taken; LoRA alone (the seed's ~945 M) under
#           74 GiB with offloaded checkpoints at batch 8 / 12
#   phase 21 (right after 20, warm): the same LoRA-alone arm with the MoE blocks compiled (torch.compile; inductor's
#           cache goes into kcache too)
#   phase 22 (right after 21, warm): what fits 74 GB (68.9 GiB) with offloaded checkpoints; the seed's full target
#           list with offloaded checkpoints and a few uncheckpointed layers under 79 GiB (COMPILE=moe adds compile)
#   phase 23 (after 20, warm; session 7 ran these as its calls 2-5): LoRA alone with and without offloaded
#           checkpoints on the H200's own memory, the seed's recipe with compiled MoE blocks; then the seed's ~945 M
#           within 74 GiB (offloaded checkpoints + the 8-bit step inside backward, profiled), batch 10 under 74 GiB
#           and batch 12 under 79 GiB (each new batch shape first pays ~100 s of tilelang compilation)
#   phase 24 (carry .whl .kcache; session 8's first call): GPU tests of the routed experts' fused Triton kernels
#           (pitlm.kernels.routed) and the other kernel tests; the 74 GiB LoRA-alone step with the kernels off
#           then on, on one model (the "on" arm profiled)
#   phase 25 (right after 24, warm): the seed's recipe under 79 GiB and batch 10 under 74 GiB with the kernels;
#           the embedding bench with the kernels on and off
#   phase 26 (carry .whl .kcache): dense LoRA with the scale on the rank side and the add in the GEMM
#           (pitlm.kernels.lora_dense) -- its tests on the GPU, then the 74 GiB step with peft's dense forward and
#           with the fused one (profiled), and the seed's recipe under 79 GiB
#   phase 27 (carry .whl .kcache): the routed kernels' GPU tests and the 74 GiB recipe profiled, with the permute's
#           row gather in Triton (gather_rows)
#   phase 28 (carry .whl .kcache): phase 27 again after the paired outputs (gradients of two readers summed in the
#           fused kernels); the GPU tests need ~70 s on a cold machine
#   phase 29 (carry .whl .kcache; session 9's first call): GPU tests of the Gated DeltaNet forward with grouped key
#           heads and in-kernel gates (pitlm.kernels) and of the router / shared-gate kernels (pitlm.kernels.moe);
#           the 74 GiB recipe with each new path switched off in turn, then all on (profiled), on one model
#   phase 30 (carry .whl .kcache): GPU tests of the routed experts' kernels with the LoRA terms in the GEMMs' K and
#           of the one-node dense LoRA; the 74 GiB recipe with each switched off, then all on (profiled)
#   phase 31 (carry .whl .kcache): the seed's recipe under 79 GiB; the embedding bench
#   phase 32 (carry .whl .kcache): GPU tests of the Triton partial rotary embedding and the fast-kernel model test
#           (session 9: their output was lost); the 74 GiB recipe without it, then with everything (profiled: device
#           time by class, H100 projection). The kernel was installed by default then; it is opt-in (--rope) now
#   phase 33 (carry .whl .kcache; session 10's first call): the rotary kernel's and the fast-kernel model's GPU tests,
#           their whole output kept in $OUT/tests33.txt; the 74 GiB recipe with --rope, profiled with the device's
#           idle gaps and the host operators that ended them (pitlm.kernels.profiling.device_gaps)
#   phase 34 (carry .whl .kcache): GPU tests of the conv + SiLU + q/k/v split kernel (pitlm.kernels.conv), the
#           fast-kernel model and the in-backward optimizer, whole output in $OUT/tests34.txt; the 74 GiB recipe with
#           the conv kernel off, then on (profiled, with the idle gaps)
#   phase 35 (carry .whl .kcache): the conv backward's tile shapes timed (scripts/conv_tiles.py), the fastest taken
#           (PITLM_CONV_TILES) for the 74 GiB recipe with the conv kernel off, then on (profiled); EMBED=1: then the
#           embedding bench
#   phase 36 (carry .whl .kcache): the 74 GiB recipe with every default path (profiled); the seed's recipe under
#           79 GiB
#   A cold machine spends > 5 min in fla's Triton autotuning before the first 35B step: run the phases that train
#   in consecutive calls on a warm machine, with TRITON_CACHE_AUTOTUNING=1.
# Usage: bash scripts/gpu_bench.sh 0|1|...|36
set -u
export TRITON_CACHE_AUTOTUNING=1
source scripts/gpu_env.sh
mkdir -p "$OUT"
B="python3 -m pitlm.cli bench"
L="--arch qwen3.5-35b-a3b --mode lora --seq 2048 --steps 3 --warmup 1"
run() { echo "=== $*"; timeout "${T:-400}" "$@" 2>&1 | grep -vE "^\s*$" | tee -a "$OUT/bench.log" | grep -E "^[a-z_0-9]+: |Error|error|=== " ; }
if [ "$1" = 0 ]; then
  python3 -c "import fla, sys; print('fla', fla.__version__)"
elif [ "$1" = 3 ]; then
  python3 -m pitlm.cli doctor 2>&1 | grep -E "flash-linear|gpu0|bitsandbytes" | tee "$OUT/doctor.txt"
  M="--ce-chunk 4096 --adapter-dtype base --optim adamw8bit"
  T=230 run $B train $L --batch 1 $M
  T=150 run $B train $L --batch 2 $M
  T=150 run $B embed --arch qwen3.5-35b-a3b --n-prompts 8192 --batch 512,1024,2048 --prompt-tokens 64
elif [ "$1" = 4 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  M="--adapter-dtype base --optim adamw8bit"
  T=200 run $B train $L --batch 1 --ce-chunk 512 $M --profile "$OUT/profile_b1.txt"
  T=130 run $B train $L --batch 4 --ce-chunk 2048 $M --full-modules ""
  T=130 run $B train $L --batch 8 --ce-chunk 2048 $M --full-modules ""
  T=100 run $B embed --arch qwen3.5-35b-a3b --n-prompts 4096 --batch 1024 --prompt-tokens 64
elif [ "$1" = 5 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  M="--adapter-dtype base --optim adamw8bit"
  python3 -m pitlm.cli doctor 2>&1 | grep -E "flash-linear|gpu0|bitsandbytes|grouped" | tee "$OUT/doctor.txt"
  T=200 run python3 scripts/gpu_check_experts.py --trials 2
  T=120 run $B train $L --batch 1 --ce-chunk 512 $M
  T=130 run $B train $L --batch 3 --ce-chunk 512 $M
  T=130 run $B train $L --batch 6 --ce-chunk 1024 $M --full-modules ""
elif [ "$1" = 6 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  M="--adapter-dtype base --optim adamw8bit"
  T=140 run $B train $L --batch ${B1:-4} --ce-chunk 512 $M
  T=140 run $B train $L --batch ${B2:-8} --ce-chunk 1024 $M --full-modules "" --profile "$OUT/profile_lora_only.txt"
  T=140 run $B train $L --batch ${B3:-2} --ce-chunk 512 $M --experts-path peft
elif [ "$1" = 7 ]; then  # after 0, carry .whl3 .whl5; the first run pays fla's Triton autotuning (~70 s)
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  M="--adapter-dtype base --optim adamw8bit"
  T=250 run $B train $L --batch 1 --ce-chunk 512 $M
  T=200 run $B train $L --batch 6 --ce-chunk 1024 $M --full-modules ""
elif [ "$1" = 8 ]; then  # several GPUs (nvidia-h200-x2 or larger), after 0, carry .whl3: issue 10
  N=$(python3 -c "import torch; print(torch.cuda.device_count())")
  nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv -l 2 > "$OUT/smi.csv" 2>&1 &
  F="--arch qwen3.5-35b-a3b --mode full --seq 2048 --steps 3 --warmup 1"
  T=220 run python3 -m torch.distributed.run --standalone --nproc-per-node=$N -m pitlm.cli bench train $F --batch 1 --set model.num_hidden_layers=${LAYERS:-20}
  T=360 run python3 scripts/fsdp_merge_check.py --arch qwen3.5-35b-a3b --layers 4 --nproc $N --seq 512 --batch 4
  kill %1 2>/dev/null
elif [ "$1" = 9 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  M="--adapter-dtype base --optim adamw8bit"
  T=200 run python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py
  T=240 run $B embed --arch qwen3.5-35b-a3b --n-prompts 4096 --batch 1024 --prompt-tokens 64 --profile "$OUT/profile_embed.txt"
  T=240 run $B train $L --batch 2 --ce-chunk 512 $M --profile "$OUT/profile_b2.txt"
elif [ "$1" = 10 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  M="--adapter-dtype base --optim adamw8bit"
  T=240 run $B train $L --batch ${B1:-4} --ce-chunk 512 $M
  T=200 run $B train $L --batch ${B2:-3} --ce-chunk 512 $M
elif [ "$1" = 11 ]; then
  timeout 420 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -25
  T=240 run $B embed --arch qwen3.5-35b-a3b --n-prompts 4096 --batch 1024 --prompt-tokens 64 --profile "$OUT/profile_embed2.txt"
elif [ "$1" = 12 ]; then
  timeout 500 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernels_experts.py 2>&1 | tail -15
elif [ "$1" = 13 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  M="--adapter-dtype base --optim adamw8bit"
  T=330 run $B train $L --batch 4 --ce-chunk 512 $M --profile "$OUT/profile_b4.txt"
  T=220 run $B train $L --batch 8 --ce-chunk 1024 $M --full-modules ""
elif [ "$1" = 14 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  M="--adapter-dtype base --optim adamw8bit"
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_experts.py 2>&1 | tail -4
  T=330 run $B train $L --batch 4 --warmup 2 --ce-chunk 512 $M
elif [ "$1" = 15 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512"
  python3 -m pitlm.cli doctor 2>&1 | grep -E "flash-linear|gpu0|bitsandbytes|grouped" | tee "$OUT/doctor.txt"
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_train_in_backward.py -k gpu 2>&1 | tail -3
  T=${T1:-320} run $B train $L $M --batch ${B1:-4,6,8} --in-backward off,on --memory-cap-gib 79.0 --profile "$OUT/profile_ib.txt"
  T=${T2:-120} run $B train $L $M --batch ${B2:-8,12} --in-backward on
elif [ "$1" = 16 ]; then
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_train_in_backward.py -k bitwise 2>&1 | tail -2
  T=150 run python3 -m pitlm.cli bench optim --arch qwen3.5-35b-a3b --optim adamw8bit --steps 10 --warmup 2
  T=100 run python3 -m pitlm.cli bench optim --arch qwen3.5-35b-a3b --optim adamw8bit --full-modules "" --steps 10
elif [ "$1" = 17 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512"
  python3 -m pitlm.cli doctor 2>&1 | grep -E "flash-linear|gpu0|bitsandbytes|grouped|liger" | tee "$OUT/doctor.txt"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_train_chunked_ce.py tests/test_kernels_experts.py \
    tests/test_train_stochastic_round.py tests/test_train_in_backward.py -k "gpu or cuda or bitwise" 2>&1 | tail -4
  T=${T1:-420} run $B train $L $M --batch 8 --memory-cap-gib 79.0 --stochastic-round full_modules \
    --profile "$OUT/profile_b8.txt"
  save_kernel_cache
elif [ "$1" = 18 ]; then
  # right after 17 on the warm machine, one process per arm: liger's fused loss off (its import blocked); the
  # LoRA-alone list (the seed's ~945 M trainable) under 74 GB; the H200's own memory with fewer checkpointed layers
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512"
  NOLIGER="import sys; sys.modules['liger_kernel'] = None; sys.argv[0] = 'pitlm'; from pitlm.cli import main; main()"
  T=110 run python3 -c "$NOLIGER" bench train $L $M --batch 8 --memory-cap-gib 79.0 --stochastic-round full_modules
  T=150 run $B train $L $M --batch 8,12,16 --memory-cap-gib 68.9 --full-modules ""
  T=170 run $B train $L $M --batch 8 --stochastic-round full_modules --uncheckpointed-layers 0,10,20
  save_kernel_cache
elif [ "$1" = 19 ]; then
  # not run yet (session 6 ran out of device time): what fits an H100's 80 GB and the seed's 74 GB -- LoRA alone at
  # small batches under 74 GB, and how many uncheckpointed layers each list affords under 79 GiB
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512"
  T=200 run $B train $L $M --batch 2,4,6 --memory-cap-gib 68.9 --full-modules ""
  T=200 run $B train $L $M --batch 8 --memory-cap-gib 79.0 --full-modules "" --uncheckpointed-layers 0,1,2
  T=150 run $B train $L $M --batch 8 --memory-cap-gib 79.0 --stochastic-round full_modules --uncheckpointed-layers 1
  save_kernel_cache
elif [ "$1" = 20 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512"
  python3 -m pitlm.cli doctor 2>&1 | grep -E "flash-linear|gpu0|bitsandbytes|grouped|liger" | tee "$OUT/doctor.txt"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_train_chunked_ce.py tests/test_train_checkpointing.py \
    -k "gpu or cuda" 2>&1 | tail -4
  T=${T1:-200} run $B train $L $M --batch 8 --memory-cap-gib 79.0 --stochastic-round full_modules
  T=${T2:-200} run $B train $L $M --batch 8,12 --memory-cap-gib 74.0 --full-modules "" --offload-checkpoints
  save_kernel_cache
elif [ "$1" = 21 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512"
  T=${T1:-480} run $B train $L $M --batch 8 --warmup 2 --memory-cap-gib 74.0 --full-modules "" --offload-checkpoints \
    --compile moe
  save_kernel_cache
elif [ "$1" = 22 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512 --offload-checkpoints --compile ${COMPILE:-none}"
  T=${T1:-240} run $B train $L $M --batch ${B1:-4,6,8} --memory-cap-gib 68.9 --full-modules ""
  T=${T2:-240} run $B train $L $M --batch 8 --memory-cap-gib 79.0 --stochastic-round full_modules \
    --uncheckpointed-layers ${U:-0,2,4}
  save_kernel_cache
elif [ "$1" = 23 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512"
  T=150 run $B train $L $M --batch 8 --full-modules "" --offload-checkpoints
  T=150 run $B train $L $M --batch 8 --full-modules ""
  T=280 run $B train $L $M --batch 8 --warmup 2 --memory-cap-gib 79.0 --stochastic-round full_modules --compile moe
  M="$M --offload-checkpoints"
  T=120 run $B train $L $M --full-modules "" --batch 8 --in-backward on --memory-cap-gib 74.0 --profile "$OUT/profile_best.txt"
  T=150 run $B train $L $M --full-modules "" --batch 8 --memory-cap-gib 79.0 --uncheckpointed-layers 1,2
  T=300 run $B train $L $M --full-modules "" --batch 10 --in-backward on --memory-cap-gib 74.0
  T=230 run $B train $L $M --full-modules "" --batch 12 --in-backward on --memory-cap-gib 79.0
  save_kernel_cache
elif [ "$1" = 24 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512 --offload-checkpoints"
  python3 -m pitlm.cli doctor 2>&1 | grep -E "flash-linear|gpu0|routed|grouped|liger" | tee "$OUT/doctor.txt"
  timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_routed.py tests/test_kernels.py \
    tests/test_kernels_experts.py -k "gpu or cuda" 2>&1 | tail -4
  T=${T1:-330} run $B train $L $M --full-modules "" --batch 8 --in-backward on --memory-cap-gib 74.0 \
    --routed-kernels off,on --profile "$OUT/profile_routed.txt"
  save_kernel_cache
elif [ "$1" = 25 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512"
  T=${T1:-170} run $B train $L $M --batch 8 --memory-cap-gib 79.0 --stochastic-round full_modules
  T=${T2:-250} run $B train $L $M --offload-checkpoints --full-modules "" --batch 10 --in-backward on \
    --memory-cap-gib 74.0
  E="embed --arch qwen3.5-35b-a3b --n-prompts 4096 --batch 1024 --prompt-tokens 64"
  T=90 run $B $E
  T=90 run $B $E --no-routed-kernels
  save_kernel_cache
elif [ "$1" = 26 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_lora_dense.py 2>&1 | tail -2
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512"
  T=${T1:-150} run $B train $L $M --offload-checkpoints --full-modules "" --batch 8 --in-backward on \
    --memory-cap-gib 74.0 --dense-path peft
  T=${T2:-170} run $B train $L $M --offload-checkpoints --full-modules "" --batch 8 --in-backward on \
    --memory-cap-gib 74.0 --profile "$OUT/profile_dense.txt"
  T=${T3:-170} run $B train $L $M --batch 8 --memory-cap-gib 79.0 --stochastic-round full_modules
  save_kernel_cache
elif [ "$1" = 27 ] || [ "$1" = 28 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_routed.py tests/test_kernels_lora_dense.py \
    -k "gpu or cuda or bf16" 2>&1 | tail -1
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512 --offload-checkpoints"
  T=${T1:-300} run $B train $L $M --full-modules "" --batch 8 --in-backward on --memory-cap-gib 74.0 \
    --profile "$OUT/profile_rows.txt"
  grep -E "gather|Self CUDA time total" "$OUT/profile_rows.txt" | head -8
elif [ "$1" = 29 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  python3 -m pitlm.cli doctor 2>&1 | grep -E "flash-linear|gpu0|routed|router|delta rule" | tee "$OUT/doctor.txt"
  timeout ${TT:-240} python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernels_moe.py \
    -k "gpu or cuda" 2>&1 | tail -4
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512 --offload-checkpoints"
  T=${T1:-420} run $B train $L $M --full-modules "" --batch 8 --in-backward on --memory-cap-gib 74.0 \
    --ablate ${ABL:-gdn,router,shared-gate,none} --profile "$OUT/profile_s9.txt"
  grep -E "Self CUDA time total" "$OUT/profile_s9.txt" | head -2
  save_kernel_cache
elif [ "$1" = 30 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  timeout ${TT:-200} python3 -m pytest -q -p no:cacheprovider tests/test_kernels_routed.py \
    tests/test_kernels_lora_dense.py tests/test_kernels_experts.py -k "gpu or cuda or bf16" 2>&1 | tail -2
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512 --offload-checkpoints"
  T=${T1:-380} run $B train $L $M --full-modules "" --batch 8 --in-backward on --memory-cap-gib 74.0 \
    --ablate ${ABL:-lora-in-k,dense-one-node,none} --profile "$OUT/profile_s9b.txt"
  grep -E "Self CUDA time total" "$OUT/profile_s9b.txt" | head -1
  save_kernel_cache
elif [ "$1" = 31 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512"
  T=${T1:-200} run $B train $L $M --batch 8 --memory-cap-gib 79.0 --stochastic-round full_modules
  T=120 run $B embed --arch qwen3.5-35b-a3b --n-prompts 4096 --batch 1024 --prompt-tokens 64
elif [ "$1" = 32 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  timeout ${TT:-150} python3 -m pytest -q -p no:cacheprovider tests/test_kernels_rope.py tests/test_kernels.py \
    -k "gpu or cuda" 2>&1 | tail -1
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512 --offload-checkpoints"
  T=${T1:-300} run $B train $L $M --full-modules "" --batch 8 --in-backward on --memory-cap-gib 74.0 \
    --ablate ${ABL:-rope,none} --profile "$OUT/profile_s9c.txt"
  tail -8 "$OUT/profile_s9c.txt"
elif [ "$1" = 33 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  timeout ${TT:-200} python3 -m pytest -v -p no:cacheprovider tests/test_kernels_rope.py tests/test_kernels.py \
    -k "gpu or cuda" > "$OUT/tests33.txt" 2>&1; echo "pytest rc: $?"
  grep -E "PASSED|FAILED|ERROR|passed|failed|Error" "$OUT/tests33.txt" | tail -12
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512 --offload-checkpoints"
  T=${T1:-300} run $B train $L $M --full-modules "" --batch 8 --in-backward on --memory-cap-gib 74.0 \
    ${EXTRA:-} --profile "$OUT/profile_s10.txt"
  sed -n '/# own device time by class/,$p' "$OUT/profile_s10.txt"
elif [ "$1" = 34 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  timeout ${TT:-240} python3 -m pytest -v -p no:cacheprovider tests/test_kernels_conv.py tests/test_kernels.py \
    tests/test_train_in_backward.py -k "gpu or cuda" > "$OUT/tests34.txt" 2>&1; echo "pytest rc: $?"
  grep -E "PASSED|FAILED|ERROR|passed|failed|Error|assert" "$OUT/tests34.txt" | tail -14
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512 --offload-checkpoints"
  T=${T1:-330} run $B train $L $M --full-modules "" --batch 8 --in-backward on --memory-cap-gib 74.0 \
    --ablate ${ABL:-conv-split,none} ${EXTRA:-} --profile "$OUT/profile_s10b.txt"
  sed -n '/# own device time by class/,$p' "$OUT/profile_s10b.txt"
  grep -E "conv|split_with|aten::cat" "$OUT/profile_s10b.txt" | cut -c1-60,100-200 | head -12
elif [ "$1" = 35 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  timeout ${TT:-150} python3 scripts/conv_tiles.py 2>&1 | grep -vE "^\s*$" | tee "$OUT/conv_tiles.txt" | tail -16
  best=$(sed -n 's/^best_tiles: //p' "$OUT/conv_tiles.txt")
  [ -n "$best" ] && [ "$best" != none ] && export PITLM_CONV_TILES=$best && echo "PITLM_CONV_TILES=$best"
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512 --offload-checkpoints"
  T=${T1:-330} run $B train $L $M --full-modules "" --batch 8 --in-backward on --memory-cap-gib 74.0 \
    --ablate ${ABL:-conv-split,none} ${EXTRA:-} --profile "$OUT/profile_s10c.txt"
  sed -n '/# own device time by class/,$p' "$OUT/profile_s10c.txt" | head -16
  grep -E "conv_" "$OUT/profile_s10c.txt" | cut -c1-60,100-200 | sort -u | head -4
  [ -n "${EMBED:-}" ] && T=${T2:-120} run $B embed --arch qwen3.5-35b-a3b --n-prompts 4096 --batch 1024 --prompt-tokens 64
elif [ "$1" = 36 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512 --offload-checkpoints"
  T=${T1:-230} run $B train $L $M --full-modules "" --batch 8 --in-backward on --memory-cap-gib 74.0 \
    --profile "$OUT/profile_s10d.txt"
  M="--adapter-dtype base --optim adamw8bit --ce-chunk 512"
  T=${T2:-170} run $B train $L $M --batch 8 --memory-cap-gib 79.0 --stochastic-round full_modules
elif [ "$1" = 1 ]; then
  python3 -m pitlm.cli doctor 2>&1 | grep -E "flash-linear|causal|liger|grouped|gpu0|triton" | tee "$OUT/doctor.txt"
  run $B train $L --batch 1
  run $B train $L --batch 1 --ce-chunk 4096
else
  python3 -m pitlm.cli doctor 2>&1 | grep -E "flash-linear|gpu0" | tee "$OUT/doctor.txt"
  run python3 scripts/gpu_check_fla.py --trials 2
  run $B train $L --batch 1 --ce-chunk 4096
  run $B train $L --batch 2 --ce-chunk 4096
  run $B train $L --batch 4 --ce-chunk 4096
  run $B embed --arch qwen3.5-35b-a3b --n-prompts 2048 --batch 128,256,512 --prompt-tokens 64
fi
