#!/usr/bin/env bash
# Build the CUDA binaries for one GPU architecture (default sm_90) and pack them into .gpu/ for
# the GPU machine, which has no Rust toolchain: there, `tar xJf .gpu/bins.tar.xz -C .gpu` gives
# .gpu/kvbits and the test binaries cuda_kernels, cuda_cache and ffi (run from the repo root).
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_HOME="${CUDA_HOME:-$(scripts/install-cuda.sh)}"
export CUDA_HOME KVBITS_CUDA_ARCHS="${KVBITS_CUDA_ARCHS:-90}"
cargo build --release --features cuda --bin kvbits
tests=(cuda_kernels cuda_cache ffi)
mapfile -t exes < <(cargo test --release --features cuda --no-run --message-format=json \
    "${tests[@]/#/--test=}" | jq -r 'select(.executable != null) | .executable')
rm -rf .gpu/bins .gpu/bins.tar.xz && mkdir -p .gpu/bins
cp target/release/kvbits .gpu/bins/
for exe in "${exes[@]}"; do cp "$exe" ".gpu/bins/$(basename "$exe" | sed 's/-[0-9a-f]*$//')"; done
strip .gpu/bins/*
# The device call carries at most 64 MiB; the stripped binaries are about 63 MB.
tar cJf .gpu/bins.tar.xz -C .gpu/bins . && rm -r .gpu/bins
ls -l .gpu
