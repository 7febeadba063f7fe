#!/usr/bin/env bash
# One GPU check for a lent device (no network): install segops without
# dependencies (torch, triton, torchvision and pytest are already there), run
# the whole test suite on CUDA, then the quick benchmarks. Logs and JSON go to
# the folder given as $1, else $OUT, else benchmarks/results/gpu_check.
# Budget: under 8 minutes on an H100 (tests ~5 min cap, benchmarks ~2 min cap).
set -u
out="${1:-${OUT:-benchmarks/results/gpu_check}}"
mkdir -p "$out"
cd "$(dirname "$0")/.."

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
} | tee "$out/env.txt"

pip install --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 \
  || { echo "install failed, see $out/install.log"; tail -20 "$out/install.log"; exit 1; }
python -m segops info | tee -a "$out/env.txt"

echo "== tests on CUDA"
timeout 330 python -m pytest -q -x --junitxml="$out/junit.xml" -p no:cacheprovider \
  > "$out/tests.log" 2>&1
tests_rc=$?
tail -25 "$out/tests.log"

echo "== quick benchmarks"
timeout 150 python -m segops bench --quick --out "$out" > "$out/bench.log" 2>&1
bench_rc=$?
cat "$out/bench.log"

echo "tests rc=$tests_rc bench rc=$bench_rc" | tee "$out/status.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
