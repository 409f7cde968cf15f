#!/usr/bin/env bash
# Source on the lent GPU machine (device tool): installs carried wheels into /tmp/site and sets the env.
# Usage: source scripts/gpu_env.sh   (carry .whl: .whl/site.tar.xz from scripts/pack_gpu_site.sh holds every
# package in one call; wheels in .whl .. .whl5 are installed too)
set -e
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ ! -f /tmp/site/.unpacked ]; then
  mkdir -p /tmp/site
  for a in .whl/*.tar.xz; do [ -f "$a" ] && xz -dc "$a" | tar -C /tmp/site -xf -; done
  touch /tmp/site/.unpacked
fi
for a in .whl/*.txz; do [ -f "$a" ] && xz -dc "$a" | tar -C /tmp/site -xf -; done  # small patch archives, each call
for d in .whl .whl2 .whl3 .whl4 .whl5; do
  if ls $d/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $d/*.whl
  fi
done
# Kernel caches (Triton incl. autotuning results, tilelang) carried from an earlier machine of the same image in
# .kcache/kcache.tar.xz (scripts/gpu_bench.sh writes $OUT/kcache.tar.xz): a fresh machine otherwise spends > 5 min
# compiling and autotuning fla's kernels before the first 35B step.
export TRITON_CACHE_DIR=/tmp/kcache/triton TILELANG_CACHE_DIR=/tmp/kcache/tilelang TRITON_CACHE_AUTOTUNING=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/inductor  # torch.compile's generated kernels (compile: moe)
if [ -f .kcache/kcache.tar.xz ] && [ ! -f /tmp/kcache/.restored ]; then
  mkdir -p /tmp/kcache && xz -dc .kcache/kcache.tar.xz | tar -C /tmp/kcache -xf - && touch /tmp/kcache/.restored
fi
# (without inductor's: the recipes do not compile; xz -9 keeps it small enough to carry beside .whl)
save_kernel_cache() { tar -C /tmp/kcache --exclude=.restored --exclude=./inductor -cf - . | xz -9 -T0 > "$OUT/kcache.tar.xz"; ls -la "$OUT/kcache.tar.xz"; }
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PITLM_HOME=${PITLM_HOME:-/tmp/pitlm-home} PITLM_NO_PROGRESS=1 PYTHONUNBUFFERED=1
set +e
