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
for d in .whl .whl2 .whl3 .whl4 .whl5; do
  if ls $d/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $d/*.whl
  fi
done
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PITLM_HOME=${PITLM_HOME:-/tmp/pitlm-home} PITLM_NO_PROGRESS=1 PYTHONUNBUFFERED=1
set +e
