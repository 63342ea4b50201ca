#!/usr/bin/env bash
# Interleaved A/B of the benchmarks' quick runs: two checkouts, each with its own .venv (its own
# editable install, so Ray workers import that checkout's code), run in turns, round by round,
# so that both see the same machine. Writes each run's output to OUT/<label>-<bench>-<round>.txt
# and a CPU reference per run to OUT/log; bench/compare_report.py turns them into a table.
#
#   git worktree add ../base <commit> && (cd ../base && python3 -m venv .venv &&
#       .venv/bin/pip install -q -e ".[dev]")
#   bench/compare.sh ../base . 3 journal runtime readside http   # OUT=/tmp/compare by default
#   .venv/bin/python bench/compare_report.py /tmp/compare
set -euo pipefail

if (($# < 4)); then
    echo "usage: bench/compare.sh BASE_DIR HEAD_DIR ROUNDS BENCH... (journal runtime readside http)" >&2
    exit 2
fi
base=$(cd "$1" && pwd); head=$(cd "$2" && pwd); rounds=$3; shift 3
out=${OUT:-/tmp/compare}
mkdir -p "$out"

cpu_reference_ms() {  # a fixed pure-Python loop: how fast this machine is right now
    python3 -c 'import time; t = time.perf_counter(); sum(range(3_000_000)); print(f"{(time.perf_counter() - t) * 1000:.0f}")'
}

for ((round = 1; round <= rounds; round++)); do
    for bench in "$@"; do
        for label in base head; do
            dir=$base; [[ $label == head ]] && dir=$head
            echo "round $round bench $bench $label cpu_ref_ms $(cpu_reference_ms) $(date -u +%T)" | tee -a "$out/log"
            (cd "$dir" && timeout 900 .venv/bin/python "bench/${bench}_bench.py" --quick \
                >"$out/$label-$bench-$round.txt" 2>&1) || echo "  exit $? (see $out/$label-$bench-$round.txt)" | tee -a "$out/log"
        done
    done
done
