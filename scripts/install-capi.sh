#!/usr/bin/env bash
# Builds the C ABI and installs it under PREFIX (default /usr/local), with a pkg-config file:
#   PREFIX/include/fusedopt.h
#   PREFIX/lib/libfusedopt.so, PREFIX/lib/libfusedopt.a
#   PREFIX/lib/pkgconfig/fusedopt.pc
# Then: cc train.c $(pkg-config --cflags --libs fusedopt)
# (with PKG_CONFIG_PATH=PREFIX/lib/pkgconfig when PREFIX is not a system prefix).
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="${1:-/usr/local}"
mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"

cargo build --release -p fusedopt-capi
version="$(sed -n 's/^version = "\(.*\)"/\1/p' capi/Cargo.toml | head -1)"

install -d "$prefix/include" "$prefix/lib/pkgconfig"
install -m 644 capi/include/fusedopt.h "$prefix/include/"
install -m 755 target/release/libfusedopt.so "$prefix/lib/"
install -m 644 target/release/libfusedopt.a "$prefix/lib/"
cat > "$prefix/lib/pkgconfig/fusedopt.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: fusedopt
Description: Fused, multi-threaded, deterministic optimizer steps for deep-learning training (C ABI)
Version: $version
Libs: -L\${libdir} -lfusedopt
Libs.private: -lpthread -ldl -lm -lrt -lutil -lgcc_s
Cflags: -I\${includedir}
PC
echo "installed fusedopt $version under $prefix"
