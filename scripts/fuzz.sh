#!/usr/bin/env bash
# Coverage-guided fuzzing with cargo fuzz (libFuzzer): runs each target in fuzz/ for RUNS
# executions on its saved corpus and prints, per target, the executions, the coverage reached
# and the findings. Benchmark tooling, not CI: the normal test suite replays the saved corpora
# and regressions (tests/fuzz_corpora.rs) without a fuzzer.
#
#   scripts/fuzz.sh [RUNS] [TARGET...]    RUNS defaults to 10,000,000; targets to all six
#
# Environment: FUZZ_MAX_LEN (input size cap in bytes, default 16384), FUZZ_SANITIZER
# (none by default: the project forbids unsafe code, and without ASan the same time buys about
# twice the executions; set address to add it), FUZZ_MINIMIZE=1 to shrink each corpus with
# cargo fuzz cmin afterwards. A finding is left in fuzz/artifacts/<target>/: copy it into
# fuzz/regressions/<target>/ once fixed, so the test suite replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-10000000}"
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  targets=(request_body sse mask_restore exposition config extproc_stream)
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
# cargo fuzz needs nightly compiler flags (sanitizer coverage). Use a nightly toolchain when one
# is installed; otherwise let the stable compiler accept them.
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  export RUSTC_BOOTSTRAP=1
fi
sanitizer="${FUZZ_SANITIZER:-none}"
mkdir -p fuzz/logs
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  log="fuzz/logs/$t.log"
  start=$(date +%s)
  status=0
  # -max_len: 16 KiB holds a long prompt, a config and the part of a metrics page whose lines
  # matter (a line is read alone); -timeout flags a hang.
  max_len="${FUZZ_MAX_LEN:-16384}"
  cargo "${toolchain[@]}" fuzz run --sanitizer "$sanitizer" "$t" "fuzz/corpus/$t" -- \
    -runs="$runs" -max_len="$max_len" -timeout=10 -rss_limit_mb=4096 \
    -print_final_stats=1 >"$log" 2>&1 || status=$?
  secs=$(($(date +%s) - start))
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)
  execs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{s += $2} END {print s + 0}')
  findings=$(find "fuzz/artifacts/$t" -type f 2>/dev/null | wc -l)
  printf '%-15s exit %-3s %6ss  execs %s  %s  findings %s\n' \
    "$t" "$status" "$secs" "$execs" "${done_line#*DONE }" "$findings"
  if [ "${FUZZ_MINIMIZE:-0}" = 1 ] && [ "$status" = 0 ]; then
    cargo "${toolchain[@]}" fuzz cmin --sanitizer "$sanitizer" "$t" "fuzz/corpus/$t" >>"$log" 2>&1
  fi
done
