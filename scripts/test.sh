#!/usr/bin/env bash
# Every test that runs without a GPU. Installs what the tests need first (gguf-py in .venv;
# cmake, pkg-config and valgrind for the C and C++ hosts of scripts/test-ffi.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-python.sh
KVBITS_REQUIRE_GGUF_PY=1 cargo test --release "$@"
scripts/test-ffi.sh
