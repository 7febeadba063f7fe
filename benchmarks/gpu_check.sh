#!/usr/bin/env bash
# One GPU check for a lent device (no network): install segops without
# dependencies (torch, triton, torchvision and pytest are already there), run
# the whole test suite on CUDA (in xdist workers when pytest-xdist is there:
# kernel compilation is the slow part), then the quick benchmark of each op
# family through the pytest front end, each under its own time cap so a slow
# family cannot lose the others.
#   benchmarks/gpu_check.sh [OUTDIR] [FAMILIES] [TEST_CAP_S]
# OUTDIR defaults to $OUT, else benchmarks/results/gpu_check; FAMILIES is a
# space-separated list, each entry F or F:CAP_S (a time cap in seconds;
# default: all, Mask R-CNN in `models`, about 9 minutes); FAMILIES="none"
# runs the tests only, TEST_CAP_S=0 the benchmarks only. The entry `probe`
# runs benchmarks/probe.py instead (where the time goes: host, graph replay,
# each kernel, every GEMM tile) on PROBE_FAMILIES (default "conv roi_align"). A 600 s device
# call fits the tests (cap 360 s) plus two or three families.
# Environment: TEST_WORKERS (xdist workers; default 12 on 16+ cores, else
# 4), TEST_ARGS (extra pytest arguments, e.g. paths), BENCH_FAIL_PCT, COMMIT
# (the commit to name when the copy on the device has no usable .git).
#
# Per family F the benchmark run
#   * is saved in pytest-benchmark's format as
#     benchmarks/results/<card>/<machine>/NNNN_<commit>_F.json (copied to
#     OUTDIR/results/<card>/<machine>/ too, to bring back from a device);
#   * is compared with the last saved run of the same card and family: the
#     cases whose median got slower by more than BENCH_FAIL_PCT percent
#     (default 10) are printed and fail the check (--benchmark-compare-fail);
#   * writes the harness's <card>.json, <card>.png (speedup per case, 1.0 and
#     target lines) and table.txt in OUTDIR/F/.
set -u
out="${1:-${OUT:-benchmarks/results/gpu_check}}"
families="${2:-probe overlap roi_align conv conv_transpose boxes masks models}"
test_cap="${3:-360}"
fail_pct="${BENCH_FAIL_PCT:-10}"
mkdir -p "$out"
cd "$(dirname "$0")/.."

commit="${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
export COMMIT="$commit"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $commit"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
} | tee "$out/env.txt"

# python -m pip: a bare `pip` can belong to another interpreter than `python`;
# --use-pep517: without it an older pip runs `setup.py develop`, which calls
# pip again with build isolation and so needs the network
python -m pip install --no-deps --no-build-isolation --use-pep517 -e . > "$out/install.log" 2>&1 \
  && python -c "import segops.kernels, segops.benchmarks" 2>> "$out/install.log" \
  || { echo "install failed, see $out/install.log"; tail -20 "$out/install.log"; exit 1; }
python -m segops info | tee -a "$out/env.txt"

tests_rc=0
if [ "$test_cap" -gt 0 ]; then
  echo "== tests on CUDA"
  workers=""
  default_workers=4  # 12 on the 16-core device machines: kernel compilation is CPU-bound
  [ "$(nproc)" -ge 16 ] && default_workers=12
  python -c "import xdist" 2>/dev/null && workers="-n ${TEST_WORKERS:-$default_workers}"
  # SIGINT at the cap: pytest stops as on Ctrl-C and still prints its summary
  # (-rfE: the failures' one-line summary; --durations: where the time went)
  # shellcheck disable=SC2086
  timeout -s INT -k 30 "$test_cap" python -m pytest -q -rfE --durations=20 $workers --maxfail=100 \
    --junitxml="$out/junit.xml" -p no:cacheprovider ${TEST_ARGS:-} > "$out/tests.log" 2>&1
  tests_rc=$?
  tail -40 "$out/tests.log"
fi

card="$(python -c 'from segops.benchmarks.harness import gpu_slug; print(gpu_slug())')"
store="benchmarks/results/$card"
bench_rc=0
for entry in $families; do
  [ "$entry" = "none" ] && break
  family="${entry%%:*}"  # FAMILY or FAMILY:CAP_S
  cap=90
  case "$family" in conv|probe) cap=150 ;; models) cap=240 ;; esac
  [ "$entry" != "$family" ] && cap="${entry#*:}"
  mkdir -p "$out/$family"
  if [ "$family" = "probe" ]; then
    echo "== probe (cap ${cap} s): ${PROBE_FAMILIES:-conv roi_align}"
    probe_args=()
    for f in ${PROBE_FAMILIES:-conv roi_align}; do probe_args+=(--family "$f"); done
    # a diagnostic: its exit status (124 at the cap) does not fail the check;
    # probe.json keeps every case measured before the cap
    timeout -s INT -k 20 "$cap" python -m segops.benchmarks.probe "${probe_args[@]}" \
      --out "$out/probe" > "$out/probe/probe.log" 2>&1
    echo "probe rc=$?"
    tail -60 "$out/probe/probe.log"
    continue
  fi
  previous="$(python -m segops.benchmarks.compare --latest "$store" --family "$family")"
  compare=()
  if [ -n "$previous" ]; then
    compare=(--benchmark-compare="$previous" --benchmark-compare-fail="median:${fail_pct}%")
    echo "== quick benchmark: $family (cap ${cap} s), compared with $previous"
  else
    echo "== quick benchmark: $family (cap ${cap} s), no earlier run of this card to compare"
  fi
  timeout -s INT -k 20 "$cap" python -m pytest benchmarks/ -q -p no:xdist -p no:cacheprovider \
    --benchmark-only --bench-quick --bench-family "$family" --bench-out "$out/$family" \
    --benchmark-storage "file://$store" --benchmark-save "${commit}_${family}" \
    --benchmark-columns min,median,max,rounds ${compare[@]+"${compare[@]}"} \
    > "$out/$family/bench.log" 2>&1 || bench_rc=$?
  grep -v '^  File \|^    ' "$out/$family/bench.log"
  saved="$(python -m segops.benchmarks.compare --latest "$store" --family "$family")"
  if [ -n "$saved" ] && [ "$saved" != "$previous" ]; then
    dest="$out/results/$card/$(basename "$(dirname "$saved")")"
    mkdir -p "$dest" && cp "$saved" "$dest/"
    echo "saved $saved"
  fi
done

echo "tests rc=$tests_rc bench rc=$bench_rc" | tee "$out/status.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
