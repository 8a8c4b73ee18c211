#!/usr/bin/env bash
# Dev-only: build caprl and run its checks on the device machine, whose image has a compiler and CMake but no
# apt and none of caprl's libraries. Prepare here, once per session:
#   mkdir -p .devdeps && (cd .devdeps && apt-get download libjansson-dev libjansson4 libutf8proc-dev libutf8proc2 \
#     libpcre2-dev libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3 libpng-dev libpng16-16 \
#     libjpeg62-turbo-dev libjpeg62-turbo libwebp-dev libwebp7 libwebpdemux2 libwebpmux3 pkgconf pkgconf-bin \
#     libpkgconf3 pkg-config zlib1g-dev)
#   cp -r ../shared .devshared     (both folders listed in .git/info/exclude, carried by the device call)
# There: scripts/device_check.sh OUT_DIR [what...], what = tests | suite | bench-train | bench | tune | ab | profile |
# attn (default: the first four). tune sweeps the AMX blocking (CAPRL_AMX_TUNE) with `caprl bench gemm` and times the
# whole bf16 benches with the fastest setting against kc=16; ab alternates the default blocking with
# CAPRL_AMX_TUNE=$AB_OTHER on the lm_head's matmuls and bf16 training; profile runs bf16 training and the bf16
# benches with CAPRL_PROFILE=1; attn times the attention kernels at their best vector width and at AVX2, and the
# vision tower's bf16 form on the matrix unit.
# BUILD_TARGETS limits the build to the named targets.
# The Debian packages are unpacked into a sysroot under /tmp (never over /), found through pkg-config's sysroot.
set -uo pipefail
OUT=${1:?usage: device_check.sh OUT_DIR [tests|suite|bench-train|bench|tune|ab|profile|attn]...}
shift
WHAT=${*:-tests suite bench-train bench}
START=$SECONDS
# the AMX settings the checks and the sweep run with ("" is the built-in default)
TUNES=${TUNES:-"kc=16 kc=4 kc=8 kc=0 kc=8,mb=256 kc=16,mb=512 kc=16"}
PIN=$(command -v taskset >/dev/null && echo "taskset -c 0,1")
BENCH_DEADLINE=${BENCH_DEADLINE:-330} # seconds after the start past which tune starts no whole bench
SYS=/tmp/caprl-sys
B=/tmp/caprl-build
LOGS=/tmp/caprl-logs # what $OUT need not bring back (it brings at most 8 files)
mkdir -p "$OUT" "$SYS" "$LOGS"
{ nproc; grep -m1 "model name" /proc/cpuinfo; getconf LEVEL2_CACHE_SIZE
  grep -o -w -E "amx_bf16|amx_tile|avx512_bf16|avx512f" /proc/cpuinfo | sort -u; } \
  >"$OUT/machine.txt"
cat "$OUT/machine.txt"
for f in .devdeps/*.deb; do dpkg -x "$f" "$SYS"; done
export PKG_CONFIG_SYSROOT_DIR=$SYS
export PKG_CONFIG_LIBDIR=$SYS/usr/lib/x86_64-linux-gnu/pkgconfig:$SYS/usr/share/pkgconfig
export LD_LIBRARY_PATH=$SYS/usr/lib/x86_64-linux-gnu:$SYS/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# pkg-config drops -I/usr/include (a system directory, even under the sysroot): put the carried headers ahead of
# the image's own (its jpeglib.h is libjpeg 8's, the carried library 6.2's). They are not system headers, so
# warnings are not fatal here (CI builds with -Werror against the system copies).
export CPATH=$SYS/usr/include:$SYS/usr/include/x86_64-linux-gnu
export CAPRL_FUZZ_TOKENIZER=$PWD/.devshared/data/qwen-tokenizer/tokenizer.json
if ! { cmake -S . -B "$B" -DCMAKE_BUILD_TYPE=Release \
         -DPKG_CONFIG_EXECUTABLE="$SYS/usr/bin/pkgconf" -DCAPRL_SHARED_DIR="$PWD/.devshared" &&
       cmake --build "$B" -j "$(nproc)" ${BUILD_TARGETS:+--target $BUILD_TARGETS}; } >"$LOGS/build.log" 2>&1; then
  tail -40 "$LOGS/build.log"
  exit 1
fi
echo "build ok after $((SECONDS - START)) s"
rc=0
for w in $WHAT; do
  case $w in
  tests) # the matmul tests that exercise AMX, under the default blocking and two others
    for tune in "" kc=4 kc=0,mb=256; do
      for t in test_ops_bwd test_ops_fwd test_ops_vision test_vision; do
        [ -x "$B/tests/$t" ] || continue
        CAPRL_AMX_TUNE=$tune "$B/tests/$t" >"$LOGS/$t.log" 2>&1 || { rc=1; echo "FAILED: $t with '$tune'"; }
        echo "$t ['$tune']: $(tail -1 "$LOGS/$t.log")"
      done
    done ;;
  tune) # forward GEMMs of the text and vision shapes under each setting, then the backward and whole benches
    for tune in $TUNES; do
      CAPRL_AMX_TUNE=$tune $PIN "$B/caprl" bench gemm --threads 2 --reps 2 --json >>"$OUT/tune_fwd.jsonl" \
        2>/dev/null || rc=1
    done
    best=$(python3 - "$OUT/tune_fwd.jsonl" 2>"$OUT/tune_summary.txt" <<'PY'
import json, math, sys
runs = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    g = math.exp(sum(math.log(x["gflops"]) for x in r["gemms"]) / len(r["gemms"]))
    runs.setdefault(r["amx_tune"], []).append(g)
    print("%-24s probe %6.0f  geomean %7.1f GFLOP/s  " % (r["amx_tune"], r["bf16_matrix_gflops"], g) +
          " ".join("%s %.0f" % (x["name"].split(".")[1][:8], x["gflops"]) for x in r["gemms"]), file=sys.stderr)
print(max(runs, key=lambda k: max(runs[k])))
PY
)
    cat "$OUT/tune_summary.txt"
    echo "fastest forward setting: $best"
    for tune in kc=16 "$best"; do
      CAPRL_AMX_TUNE=$tune $PIN "$B/caprl" bench gemm --threads 2 --reps 3 --shapes text --pass all \
        >>"$OUT/tune_bwd.txt" 2>/dev/null || rc=1
    done
    cat "$OUT/tune_bwd.txt"
    for tune in "$best" kc=16; do
      [ $((SECONDS - START)) -lt "$BENCH_DEADLINE" ] || { echo "no time left for the benches with '$tune'"; break; }
      echo "== $tune" | tee -a "$OUT/tune_bench.txt"
      CAPRL_AMX_TUNE=$tune $PIN "$B/caprl" bench --threads 2 --dtype bf16 --decode-steps 4 >>"$OUT/tune_bench.txt" \
        2>/dev/null || rc=1
      CAPRL_AMX_TUNE=$tune $PIN "$B/caprl" bench train --threads 2 --precision bf16 >>"$OUT/tune_bench.txt" \
        2>/dev/null || rc=1
      echo "after $((SECONDS - START)) s" >>"$OUT/tune_bench.txt"
    done
    cat "$OUT/tune_bench.txt" ;;
  ab)
    for i in 1 2 3; do
      for tune in "" "${AB_OTHER:-mb=1024}"; do
        for m in 512 256; do
          echo "[$tune] $(CAPRL_AMX_TUNE=$tune $PIN "$B/caprl" bench gemm --threads 2 --reps 2 --m $m --n 151936 \
            --k 896 --pass all 2>/dev/null | tail -3 | tr -s ' ' | tr '\n' ';')" | tee -a "$OUT/ab.txt"
        done
      done
    done
    for tune in "" "${AB_OTHER:-mb=1024}"; do
      echo "== [$tune] bench train" >>"$OUT/ab.txt"
      CAPRL_AMX_TUNE=$tune $PIN "$B/caprl" bench train --threads 2 --precision bf16 >>"$OUT/ab.txt" 2>/dev/null || rc=1
    done
    grep -A6 "bench train" "$OUT/ab.txt" | grep -E "==|step|phases" ;;
  profile) # where the bf16 training step and the bf16 benches spend their time, op by op (CAPRL_PROFILE)
    CAPRL_PROFILE=1 $PIN "$B/caprl" bench train --threads 2 --precision bf16 --steps 1 >"$OUT/profile.txt" 2>&1 || rc=1
    CAPRL_PROFILE=1 $PIN "$B/caprl" bench --threads 2 --dtype bf16 --decode-steps 4 >>"$OUT/profile.txt" 2>&1 || rc=1
    grep -v "^bench" "$OUT/profile.txt" ;;
  attn) # the attention kernels alone, AVX-512 then AVX2 (the same bits; the ratio is the vector width's worth),
    # then the vision tower's bf16 form on the matrix unit
    for isa in best avx2 best avx2; do
      $PIN "$B/caprl" bench attn --threads 2 --isa $isa >>"$OUT/attn.txt" 2>/dev/null || rc=1
    done
    for i in 1 2; do
      $PIN "$B/caprl" bench attn --threads 2 --kind vision --bf16 >>"$OUT/attn.txt" 2>/dev/null || rc=1
    done
    grep -E "^(decoder|train|vision)" "$OUT/attn.txt" ;;
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
