#!/usr/bin/env bash
# Builds the release library and installs what C and C++ hosts need into PREFIX:
# include/kvbits.h and kvbits.hpp, lib/libkvbits.a and the shared library,
# lib/cmake/kvbits/kvbits-config.cmake and lib/pkgconfig/kvbits.pc.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -ne 1 ]]; then
  echo "usage: $0 PREFIX" >&2
  exit 2
fi
mkdir -p "$1"
prefix="$(cd "$1" && pwd)"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"

cargo build --release --lib
shared=target/release/libkvbits.so
[[ "$(uname)" == Darwin ]] && shared=target/release/libkvbits.dylib

install -d "$prefix/include" "$prefix/lib/cmake/kvbits" "$prefix/lib/pkgconfig"
install -m 644 ffi/kvbits.h ffi/kvbits.hpp "$prefix/include/"
install -m 644 target/release/libkvbits.a "$prefix/lib/"
install -m 755 "$shared" "$prefix/lib/"
install -m 644 ffi/cmake/kvbits-config.cmake "$prefix/lib/cmake/kvbits/"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" ffi/kvbits.pc.in >"$prefix/lib/pkgconfig/kvbits.pc"
echo "kvbits $version installed in $prefix"
