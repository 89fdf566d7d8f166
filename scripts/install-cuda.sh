#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 toolkit (nvcc, cudart, headers) from PyPI into
# $KVBITS_CUDA_VENV (default ~/.cache/kvbits-cuda13) and prints the CUDA_HOME to use:
#   export CUDA_HOME=$(scripts/install-cuda.sh)
# Compiling needs no GPU. Every part is pinned to 13.0: unpinned, pip mixes 13.x headers with
# the 13.0 compiler.
set -euo pipefail

# bindgen (the Rust declarations of csrc/kvbits_cuda.h) needs libclang.
if ! ldconfig -p 2>/dev/null | grep -q 'libclang\(-[0-9.]*\)\?\.so'; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev; } >&2
    else
        echo "install-cuda.sh: bindgen needs libclang: install libclang-dev" >&2
        exit 1
    fi
fi

venv="${KVBITS_CUDA_VENV:-$HOME/.cache/kvbits-cuda13}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" >&2
fi
home=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))' 2>/dev/null || true)
if [ -z "$home" ] || [ ! -x "$home/bin/nvcc" ]; then
    "$venv/bin/pip" install -q --disable-pip-version-check \
        nvidia-cuda-nvcc==13.0.88 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-cccl==13.0.*' \
        'nvidia-cuda-crt==13.0.*' 'nvidia-nvvm==13.0.*' >&2
    home=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
fi
"$home/bin/nvcc" --version >&2
echo "$home"
