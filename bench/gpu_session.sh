#!/usr/bin/env bash
# What to run when a GPU is lent (docs/RESULTS.md, "LLaMA-60M on one GPU"): bench/gpu_check.py first,
# then the gpu60m quality study of bench/quality.py in the time left.
#
#   bash bench/gpu_session.sh [all|check|study] [bench/quality.py options, e.g. --seed 1 --rows fira,galore]
#
#   all    (default) gpu_check.py, then the study with what is left of SESSION_BUDGET_S
#   check  gpu_check.py alone
#   study  the study alone, with SESSION_BUDGET_S
#
# SESSION_BUDGET_S (default 540): seconds this command may take; keep it under the call's timeout_s
# (at most 600). The study trains the rows that fit and leaves the others for the next call (its
# runs are cached by row and seed). Outputs go to $OUT when set (5 files: gpu_check.json,
# gpu_check.log, quality_gpu60m.json, quality_gpu60m.png, quality_gpu60m.log), else bench/results
# and docs/img. The corpus is read from $FULLRANK_DATA, else ../shared/data, else .data/ (the copy
# a device call carries; see docs/RESULTS.md).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
[ $# -gt 0 ] && shift
case "$mode" in
  all|check|study) ;;
  *) echo "gpu_session.sh: the mode must be all, check or study, got '$mode'" >&2; exit 2 ;;
esac
budget=${SESSION_BUDGET_S:-540}
if ! [[ "$budget" =~ ^[0-9]+$ ]] || [ "$budget" -lt 120 ]; then
  echo "gpu_session.sh: SESSION_BUDGET_S must be a whole number of seconds, at least 120, got '$budget'" >&2; exit 2
fi
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -z "${FULLRANK_DATA:-}" ]; then
  for candidate in ../shared/data .data; do
    if [ -f "$candidate/enwiki-2015-train.jsonl.gz" ]; then export FULLRANK_DATA="$PWD/$candidate"; break; fi
  done
fi
start=$SECONDS
status=0

if [ "$mode" != study ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then  # the official packages, when carried as wheels (gpu_check.py's peer rows)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  timeout $((budget - 30)) python3 bench/gpu_check.py 2>&1 | tee "$out/gpu_check.log"
  status=${PIPESTATUS[0]}
  echo "gpu_check.py: exit $status after $((SECONDS - start)) s"
fi

if [ "$mode" != check ]; then
  # the study kills its runs 30 s past its budget, then writes its JSON and plot: keep 60 s for that
  left=$((budget - (SECONDS - start) - 60))
  if [ "$left" -lt 90 ]; then
    echo "study not started: ${left} s left of SESSION_BUDGET_S=$budget; next call: bash bench/gpu_session.sh study $*"
    exit "$status"
  fi
  python3 bench/quality.py --profile gpu60m --budget-s "$left" "$@" 2>&1 | tee "$out/quality_gpu60m.log"
  study_status=${PIPESTATUS[0]}
  [ "$study_status" -ne 0 ] && status=$study_status
fi
exit "$status"
