#!/usr/bin/env bash
# Builds every tests/fuzz/fuzz_*.c as a libFuzzer binary (clang, ASan + UBSan) against the C
# files its header comment names on a "fuzz-sources:" line, and runs each for a bounded time, seeded from tests/fuzz/corpus/<name>/ and
# tests/fixtures/. Any crash, sanitizer report or abort fails the run.
#   usage: tests/fuzz/run.sh OUTDIR SECONDS
set -euo pipefail
out=${1:-build/fuzz}
secs=${2:-20}
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
CLANG=${CLANG:-$(command -v clang || command -v clang-14 || true)}
if [ -z "$CLANG" ]; then
    echo "fuzz: clang not found (apt-get install clang libclang-rt-14-dev)" >&2
    exit 1
fi
rm -rf "$out"
mkdir -p "$out"
flags=(-std=c11 -g -O1 -D_GNU_SOURCE -DM3_DEBUG=1 -fsanitize=fuzzer,address,undefined
       -fno-sanitize-recover=undefined -Icsrc)
status=0
for src in tests/fuzz/fuzz_*.c; do
    name=$(basename "$src" .c)
    bin="$out/$name"
    read -r -a srcs <<< "$(sed -n 's/^ \* fuzz-sources: *//p' "$src" | head -1)"
    if [ ${#srcs[@]} -eq 0 ]; then
        echo "fuzz: $src has no 'fuzz-sources:' line" >&2
        exit 1
    fi
    "$CLANG" "${flags[@]}" "$src" "${srcs[@]}" -o "$bin" -lm -lpthread
    corpus="$out/corpus-$name"
    mkdir -p "$corpus"
    if [ -d "tests/fuzz/corpus/$name" ]; then cp -r "tests/fuzz/corpus/$name/." "$corpus/"; fi
    cp tests/fixtures/*.bin "$corpus/" 2>/dev/null || true
    echo "fuzz: $name for ${secs}s"
    if ! ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
        "$bin" -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$out/$name-" "$corpus" > "$out/$name.log" 2>&1; then
        echo "fuzz: $name FAILED; last lines of $out/$name.log:" >&2
        tail -40 "$out/$name.log" >&2
        status=1
    else
        grep -E "stat::number_of_executed_units|cov:" "$out/$name.log" | tail -2
    fi
done
exit $status
