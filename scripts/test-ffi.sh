#!/usr/bin/env bash
# The C ABI from C and C++ hosts, against the freshly built library: the header compiles alone
# as C99 and C++17 under -Wall -Wextra -Werror -pedantic; host.c and host.cpp are built through
# the CMake example (static library) and through pkg-config (shared library) and run on every
# preset against the demo GGUF; the C host runs under valgrind, which must find no leak and no
# invalid access. Installs cmake, pkg-config and valgrind with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in cmake pkg-config valgrind; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
command -v cc >/dev/null && command -v c++ >/dev/null || missing+=(gcc g++)
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "test-ffi: missing ${missing[*]}: install them (e.g. sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

work="$PWD/target/ffi-test"
rm -rf "$work"
mkdir -p "$work"
prefix="$work/prefix"
scripts/install-ffi.sh "$prefix"
cargo build --release --bin kvbits
target/release/kvbits inspect --write-demo "$work/demo" >/dev/null
model="$work/demo/qwen2.5-vl-7b-demo.gguf"
strict=(-Wall -Wextra -Werror -pedantic -I"$prefix/include")

echo "== the header alone: C99, C++17"
echo '#include "kvbits.h"' | cc -std=c99 "${strict[@]}" -x c -fsyntax-only -
echo '#include "kvbits.h"' | c++ -std=c++17 "${strict[@]}" -x c++ -fsyntax-only -
echo '#include "kvbits.hpp"' | c++ -std=c++17 "${strict[@]}" -x c++ -fsyntax-only -

echo "== CMake: find_package(kvbits), static library, ctest"
cmake -S ffi/examples -B "$work/cmake" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$prefix" -DKVBITS_MODEL="$model" >/dev/null
cmake --build "$work/cmake" -j 2
(cd "$work/cmake" && ctest --output-on-failure)

echo "== pkg-config, shared library"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
cc -std=c99 "${strict[@]}" -O2 ffi/examples/host.c $(pkg-config --cflags --libs kvbits) -lm -o "$work/host_c_shared"
c++ -std=c++17 "${strict[@]}" -O2 ffi/examples/host.cpp $(pkg-config --cflags --libs kvbits) -o "$work/host_cpp_shared"
LD_LIBRARY_PATH="$prefix/lib" "$work/host_c_shared" "$model" "$work/shared_c.gguf" calibquant
LD_LIBRARY_PATH="$prefix/lib" "$work/host_cpp_shared" "$model" "$work/shared_cpp.gguf" vidkv

echo "== valgrind: the C host"
valgrind --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect,possible \
  --suppressions=ffi/valgrind.supp \
  "$work/cmake/host_c" "$model" "$work/valgrind.gguf" akvq
echo "test-ffi: all host checks passed"
