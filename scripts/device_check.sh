#!/usr/bin/env bash
# Dev-only: build caprl and run its checks on the device machine, whose image has a compiler and CMake but no
# apt and none of caprl's libraries. Prepare here, once per session:
#   mkdir -p .devdeps && (cd .devdeps && apt-get download libjansson-dev libjansson4 libutf8proc-dev libutf8proc2 \
#     libpcre2-dev libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3 libpng-dev libpng16-16 \
#     libjpeg62-turbo-dev libjpeg62-turbo libwebp-dev libwebp7 libwebpdemux2 libwebpmux3 pkgconf pkgconf-bin \
#     libpkgconf3 pkg-config zlib1g-dev)
#   cp -r ../shared .devshared     (both folders listed in .git/info/exclude, carried by the device call)
# There: scripts/device_check.sh OUT_DIR [what...], what = tests | suite | bench-train | bench (default: all).
# The Debian packages are unpacked into a sysroot under /tmp (never over /), found through pkg-config's sysroot.
set -uo pipefail
OUT=${1:?usage: device_check.sh OUT_DIR [tests|suite|bench-train|bench]...}
shift
WHAT=${*:-tests suite bench-train bench}
SYS=/tmp/caprl-sys
B=/tmp/caprl-build
mkdir -p "$OUT" "$SYS"
{ nproc; grep -m1 "model name" /proc/cpuinfo; grep -o -w -E "amx_bf16|amx_tile|avx512_bf16|avx512f" /proc/cpuinfo | sort -u; } \
  >"$OUT/machine.txt"
cat "$OUT/machine.txt"
for f in .devdeps/*.deb; do dpkg -x "$f" "$SYS"; done
export PKG_CONFIG_SYSROOT_DIR=$SYS
export PKG_CONFIG_LIBDIR=$SYS/usr/lib/x86_64-linux-gnu/pkgconfig:$SYS/usr/share/pkgconfig
export LD_LIBRARY_PATH=$SYS/usr/lib/x86_64-linux-gnu:$SYS/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# pkg-config drops -I/usr/include (a system directory, even under the sysroot): put the carried headers ahead of
# the image's own (its jpeglib.h is libjpeg 8's, the carried library 6.2's)
export CPATH=$SYS/usr/include:$SYS/usr/include/x86_64-linux-gnu
export CAPRL_FUZZ_TOKENIZER=$PWD/.devshared/data/qwen-tokenizer/tokenizer.json
if ! { cmake -S . -B "$B" -DCMAKE_BUILD_TYPE=Release -DCAPRL_FATAL_WARNINGS=ON \
         -DPKG_CONFIG_EXECUTABLE="$SYS/usr/bin/pkgconf" -DCAPRL_SHARED_DIR="$PWD/.devshared" &&
       cmake --build "$B" -j "$(nproc)"; } >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
echo "build ok"
rc=0
for w in $WHAT; do
  case $w in
  tests) # the matmul tests that exercise AMX, verbose
    for t in test_ops_bwd test_ops_fwd; do
      "$B/tests/$t" >"$OUT/$t.log" 2>&1 || rc=1
      tail -3 "$OUT/$t.log"
    done ;;
  suite)
    (cd "$B" && ctest -L "unit|ops|golden|tools|fuzz-replay" -j "$(nproc)" --output-on-failure) >"$OUT/suite.log" 2>&1 || rc=1
    grep -E "tests passed|tests failed|\(Failed\)|\(SEGFAULT\)|\(Timeout\)|CHECK failed" "$OUT/suite.log" | head -40 ;;
  bench-train)
    "$B/caprl" bench train --threads 2 --precision both >"$OUT/bench_train.txt" 2>"$OUT/bench_train.err" || rc=1
    cat "$OUT/bench_train.txt" ;;
  bench)
    "$B/caprl" bench --threads 2 --dtype bf16 >"$OUT/bench.txt" 2>"$OUT/bench.err" || rc=1
    cat "$OUT/bench.txt" ;;
  *) echo "unknown check: $w"; rc=2 ;;
  esac
done
exit $rc
