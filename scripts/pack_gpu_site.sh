#!/usr/bin/env bash
# Pack the GPU machine's missing packages into ONE archive that travels with a single device call (issue 9).
# Wheels are zip (deflate): fla + tilelang + its deps + z3 + bitsandbytes are ~125 MB as wheels, over the 64 MiB a
# call may carry, which forced two calls on a warm machine. Unpacked (bitsandbytes without its CUDA 11/12, ROCm and
# XPU libraries) and compressed with xz -9e they are ~52 MB: one call. scripts/gpu_env.sh unpacks it into /tmp/site.
# Usage (here, in the repo root; ~4 min of xz on 2 cores): bash scripts/pack_gpu_site.sh  -> .whl/site.tar.xz
set -euo pipefail
grep -qs '^/.whl' .git/info/exclude || echo '/.whl*/' >> .git/info/exclude
w=$(mktemp -d); site=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$w" \
  "flash-linear-attention==0.6.0" "fla-core==0.6.0" "tilelang==0.1.15" "apache-tvm-ffi==0.1.12" \
  "torch-c-dlpack-ext==0.1.5" "z3-solver==4.15.4.0" "bitsandbytes==0.50.2" \
  "pydantic==2.12.5" "pydantic-core==2.41.5" "annotated-types==0.8.0" "typing-inspection==0.4.5" \
  "typing-extensions==4.16.0" \
  "liger-kernel==0.8.5"  # pydantic: pitlm's own config layer, not on the GPU image; liger: the fused linear CE
for f in "$w"/*.whl; do unzip -q -o "$f" -d "$site"; done
# not needed on the image (torch cu130): other CUDA/ROCm/XPU builds of bitsandbytes and z3's command-line binary
# (tilelang imports the library); room for the kernel cache (.kcache) within a call's 64 MiB. tvm_ffi's
# libtvm_ffi_testing.so must stay: tvm_ffi.core links it at import (removing it made tilelang, hence fla, unusable).
rm -f "$site"/bitsandbytes/libbitsandbytes_rocm* "$site"/bitsandbytes/libbitsandbytes_cuda1[12]*.so \
      "$site"/bitsandbytes/libbitsandbytes_cuda13[1-9]*.so "$site"/bitsandbytes/libbitsandbytes_xpu* \
      "$site"/z3_solver-*.data/data/bin/z3
mkdir -p .whl
tar -C "$site" -cf - . | xz -9e -T0 > .whl/site.tar.xz.tmp && mv .whl/site.tar.xz.tmp .whl/site.tar.xz && rm -f .whl/site2.tar.xz .whl/tvmfix.txz
rm -rf "$w" "$site"
ls -la .whl/site.tar.xz
