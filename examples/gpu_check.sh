#!/usr/bin/env bash
# Every GPU measurement the project owes, as one command for a bare GPU machine (issue 18, docs/gpu.md):
#
#   bash examples/gpu_check.sh OUTDIR [--dry-run] [--only STEP,STEP] [--warm-start DIR]
#
# Set-up installs fairseq from the wheels in .whl/ (`make gpu-wheels` on a CPU machine); then each
# step of examples/gpu_check.py runs under `timeout`, in order, all within one budget
# (GPU_CHECK_BUDGET seconds, default 470: the issue's 8 minutes less the summary; dry run 900). A step that fails
# or runs out of time is recorded as such and the next one starts. After every step OUTDIR holds
# results.jsonl (one line per step so far), summary.md (rewritten; final at the end) and
# logs.tar.gz (every log and table): a run cut short still leaves what it measured. Three files,
# because the device tool returns at most eight.
#   --dry-run       the same steps at tiny sizes on CPU, seconds each (tests/test_gpu_check.py)
#   --only a,b      these steps only (set-up and the data they need are added)
#   --warm-start D  the optional warm-start step's folder (or GPU_CHECK_WARM_START); skipped without
# Environment: GPU_CHECK_PYTHON (default python3), GPU_CHECK_WORK (scratch folder, default a new
# one under /tmp), GPU_CHECK_COMMIT (shown in the summary), GPU_CHECK_FAIL=STEP[,STEP] (those steps
# fail on purpose: tests the bookkeeping), GPU_CHECK_LIMIT_<STEP>=S (that step's time limit).
# Exit status: 0 when no step failed or timed out, else 1.
set -uo pipefail  # no -e: a failing step is recorded, and the next one runs
cd "$(dirname "$0")/.."
ROOT=$PWD

usage() { echo "usage: bash examples/gpu_check.sh OUTDIR [--dry-run] [--only STEP,STEP] [--warm-start DIR]" >&2; exit 2; }
[[ $# -ge 1 && $1 != -* ]] || usage
OUT=$(mkdir -p "$1" && cd "$1" && pwd) || usage
shift
MODE=() ONLY=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) MODE+=(--dry-run); shift ;;
    --only) ONLY=${2:?--only needs a list of steps}; shift 2 ;;
    --warm-start) MODE+=(--warm-start "${2:?--warm-start needs a folder}"); shift 2 ;;
    *) usage ;;
  esac
done

PY=${GPU_CHECK_PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}
mkdir -p "$WORK/logs" "$WORK/tables"
rm -f "$OUT/results.jsonl" "$OUT/summary.md" "$OUT/logs.tar.gz"
# the checkout is the package (no installed copy to go stale); fairseq's --user-dir points here too
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore \
  PIP_DISABLE_PIP_VERSION_CHECK=1
BUDGET=${GPU_CHECK_BUDGET:-470}
if [[ " ${MODE[*]-} " == *" --dry-run "* ]]; then
  BUDGET=${GPU_CHECK_BUDGET:-900}
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
fi
# one build of the off-ramp extensions for every step: the folder tests/conftest.py gives the tests
ELMER_EXT_CACHE=${ELMER_EXT_CACHE:-$("$PY" -c 'import os, tempfile
print(f"{tempfile.gettempdir()}/elmer_fairseq-test-cache-{os.getuid()}/elmer_fairseq")')}
export ELMER_EXT_CACHE
ARGS=(--work "$WORK" --out "$OUT" "${MODE[@]}")
START=$(date +%s)
DEADLINE=$((START + BUDGET))

PLAN=$("$PY" examples/gpu_check.py steps --only "$ONLY" "${ARGS[@]}") || exit 2
mapfile -t PLAN <<< "$PLAN"  # an array: the steps must not read the plan from stdin
echo "gpu_check: results in $OUT, scratch in $WORK, budget ${BUDGET} s"
timeout 60 "$PY" examples/gpu_check.py env "${ARGS[@]}" > "$WORK/logs/env.log" 2>&1 || echo "gpu_check: env failed (see logs)"

FAILED=0
for entry in "${PLAN[@]}"; do
  read -r name limit selected <<< "$entry"
  limit_var=GPU_CHECK_LIMIT_$name
  limit=${!limit_var:-$limit}
  left=$((DEADLINE - $(date +%s)))
  reason=""
  if [[ $selected != 1 ]]; then
    reason="not selected (--only)"
  elif ((left < 10)); then
    reason="the run's budget of ${BUDGET} s was used up"
  fi
  if [[ -n $reason ]]; then
    "$PY" examples/gpu_check.py record "${ARGS[@]}" --name "$name" --rc 77 --reason "$reason"
    continue
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s)"
  t0=$(date +%s.%N)
  # -k: what ignores the TERM is killed 10 s later; timeout signals the step's whole process group
  GPU_CHECK_STEP_LIMIT=$limit timeout -k 10 "$limit" "$PY" examples/gpu_check.py "$name" "${ARGS[@]}" \
    > "$WORK/logs/$name.log" 2>&1 < /dev/null
  rc=$?
  seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
  "$PY" examples/gpu_check.py record "${ARGS[@]}" --name "$name" --rc "$rc" --seconds "$seconds" --limit "$limit"
  tail -n 1 "$OUT/results.jsonl" | "$PY" -c 'import json, sys; e = json.load(sys.stdin); print("   %s, %s s: %s" % (e["status"], e["seconds"], e["note"]))'
  [[ $rc == 0 || $rc == 77 ]] || FAILED=1
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs tables 2>/dev/null
done

"$PY" examples/gpu_check.py summary "${ARGS[@]}" --final --elapsed $(($(date +%s) - START))
echo "gpu_check: $OUT/summary.md"
cat "$OUT/summary.md"
exit $FAILED
