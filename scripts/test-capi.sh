#!/usr/bin/env bash
# The C ABI's tests (capi/): builds libfusedopt.so and libfusedopt.a, checks that
# capi/include/fusedopt.h is what cbindgen makes of capi/src/lib.rs, compiles the C test program
# and the examples with the system's cc / c++, and runs:
#   - the test program against the shared library, recording a trace of every step, which
#     capi/tests/replay.rs replays through the Rust API and compares bitwise;
#   - the test program linked statically under AddressSanitizer and UndefinedBehaviorSanitizer;
#   - the test program under valgrind (memcheck, leaks included);
#   - the C and C++ examples, and the README's (also built through scripts/install-capi.sh's
#     pkg-config file);
#   - a short run of the overhead benchmark (`test_capi --bench`), which fails only past 1.5x.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p fusedopt-capi
lib="$PWD/target/release"
out="$PWD/target/capi"
rm -rf "$out"
mkdir -p "$out/state"

cflags=(-std=c11 -Wall -Wextra -Werror -pedantic -O2 -Icapi/include)
shared=(-L"$lib" -lfusedopt -Wl,-rpath,"$lib" -lpthread -lm)
# What the Rust standard library needs besides (`cargo rustc -- --print native-static-libs`).
static=("$lib/libfusedopt.a" -lpthread -ldl -lm -lrt -lutil -lgcc_s)

echo "== C ABI: test program, shared library, with a trace"
cc "${cflags[@]}" capi/tests/test_capi.c -o "$out/test_capi" "${shared[@]}"
"$out/test_capi" --trace "$out/trace.bin" --dir "$out/state"

echo "== C ABI: header up to date, Rust unit tests, replay of the trace through the Rust API"
FUSEDOPT_CAPI_TRACE="$out/trace.bin" cargo test --release -p fusedopt-capi -- --include-ignored

echo "== C ABI: test program, static library, AddressSanitizer + UndefinedBehaviorSanitizer"
cc "${cflags[@]}" -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
    capi/tests/test_capi.c -o "$out/test_capi_asan" "${static[@]}"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    "$out/test_capi_asan" --dir "$out/state"

echo "== C ABI: test program under valgrind"
valgrind --quiet --error-exitcode=99 --leak-check=full \
    --show-leak-kinds=definite,indirect,possible --errors-for-leak-kinds=definite,indirect,possible \
    --suppressions=capi/tests/valgrind.supp "$out/test_capi" --dir "$out/state"

echo "== C ABI: examples"
cc "${cflags[@]}" capi/examples/train.c -o "$out/train" "${shared[@]}"
"$out/train" "$out/state/train.state"
c++ -std=c++17 -Wall -Wextra -Werror -pedantic -O2 -Icapi/include capi/examples/train.cpp \
    -o "$out/train_cpp" "${shared[@]}"
"$out/train_cpp"

echo "== C ABI: the README's example"
awk '/^## From C/ { on = 1 } on && /^```c$/ { code = 1; next } code && /^```$/ { exit } code' \
    README.md > "$out/readme.c"
cc "${cflags[@]}" "$out/readme.c" -o "$out/readme" "${shared[@]}"
"$out/readme" | tee "$out/readme.txt"
grep -q "w\[0\] = 3.000" "$out/readme.txt"

echo "== C ABI: scripts/install-capi.sh and pkg-config"
bash scripts/install-capi.sh "$out/prefix"
export PKG_CONFIG_PATH="$out/prefix/lib/pkgconfig"
test "$(pkg-config --modversion fusedopt)" = "$(sed -n 's/^version = "\(.*\)"/\1/p' capi/Cargo.toml | head -1)"
# shellcheck disable=SC2046 # pkg-config's flags are words
cc "${cflags[@]}" "$out/readme.c" -o "$out/readme_pc" $(pkg-config --cflags --libs fusedopt) \
    -Wl,-rpath,"$out/prefix/lib"
"$out/readme_pc" | grep -q "w\[0\] = 3.000"

echo "== C ABI: overhead of a 4096-parameter Adam step against the Rust API"
"$out/test_capi" --bench 7 | tee "$out/bench.txt"
awk '/ratio C \/ Rust/ { exit !($5 < 1.5) }' "$out/bench.txt"
