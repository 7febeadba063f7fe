#!/usr/bin/env bash
# One GPU check for a lent device (no network): install segops without
# dependencies (torch, triton, torchvision and pytest are already there), run
# the whole test suite on CUDA (4 xdist workers when pytest-xdist is there:
# kernel compilation is the slow part), then the quick benchmark of each op family, each in its own
# folder and under its own time cap so a slow family cannot lose the others.
#   benchmarks/gpu_check.sh [OUTDIR] [FAMILIES] [TEST_CAP_S]
# OUTDIR defaults to $OUT, else benchmarks/results/gpu_check; FAMILIES is a
# space-separated list (default: all, about 7 minutes); FAMILIES="none"
# runs the tests only, TEST_CAP_S=0 the benchmarks only. A 600 s device call
# fits the tests (cap 360 s) plus two or three families.
set -u
out="${1:-${OUT:-benchmarks/results/gpu_check}}"
families="${2:-overlap roi_align conv conv_transpose boxes masks models}"
test_cap="${3:-360}"
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

tests_rc=0
if [ "$test_cap" -gt 0 ]; then
  echo "== tests on CUDA"
  workers=""
  python -c "import xdist" 2>/dev/null && workers="-n 4"
  timeout "$test_cap" python -m pytest -q $workers --maxfail=25 --junitxml="$out/junit.xml" \
    -p no:cacheprovider > "$out/tests.log" 2>&1
  tests_rc=$?
  tail -40 "$out/tests.log"
fi

bench_rc=0
for family in $families; do
  [ "$family" = "none" ] && break
  cap=90
  case "$family" in conv|models) cap=150 ;; esac
  echo "== quick benchmark: $family (cap ${cap} s)"
  mkdir -p "$out/$family"
  timeout "$cap" python -m segops bench --quick --ops "$family" --out "$out/$family" \
    > "$out/$family/bench.log" 2>&1 || bench_rc=$?
  cat "$out/$family/bench.log"
done

echo "tests rc=$tests_rc bench rc=$bench_rc" | tee "$out/status.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
