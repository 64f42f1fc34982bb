#!/usr/bin/env bash
# fdp's GPU check, for a machine with one NVIDIA GPU and no network (about 5 minutes on one
# H200; every stage is time-limited, so at most 8). Run from anywhere:
#
#     bash scripts/device-check.sh
#
# Stages (a failure is reported in the summary and the script goes on):
#   env      which Python and torch: FDP_PYTHON if set, else the repository's virtual
#            environment (FDP_VENV or .venv) if its torch imports, else python3; only when
#            none has torch, `python3 dev.py setup` (FDP_TORCH_INDEX_URL picks torch's index;
#            it needs the network). Reports torch.cuda.is_available() and the GPU.
#   tests    tests/test_cuda.py and tests/test_bench_cuda.py (skipped tests without CUDA)
#   marked   every other test marked `cuda` (pytest -m cuda)
#   bench    python -m fdp.bench --device cuda --quick --json (CUDA-synchronised timers,
#            reduce-overhead compile, peak CUDA memory, NCCL on one rank)
# Everything goes to $OUT (the device runner collects it) or, unset, to device-check-out/ in
# the repository: one log per stage, bench-cuda.json, env.txt and summary.txt. The summary is
# printed last; the exit status is 0 only if every stage passed.

set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
OUT_DIR="${OUT:-$ROOT/device-check-out}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's fdp, installed or not
START=$SECONDS
SUMMARY=()
FAILED=0

# stage NAME SECONDS COMMAND...: runs COMMAND with a time limit, its output in NAME.log
stage() {
    local name="$1" limit="$2"
    shift 2
    local log="$OUT_DIR/$name.log" began=$SECONDS rc
    echo "=== $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    tail -n 25 "$log"
    local took=$((SECONDS - began)) status
    case $rc in
        0) status="ok" ;;
        124 | 137) status="TIMEOUT after ${limit} s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    [ $rc -eq 0 ] || FAILED=1
    SUMMARY+=("$(printf '%-7s %-28s %4d s  %s' "$name" "$status" "$took" "$log")")
}

skip() {
    SUMMARY+=("$(printf '%-7s %-28s' "$1" "SKIPPED: $2")")
    FAILED=1
}

has_torch() { "$1" -c "import torch" >/dev/null 2>&1; }

# --- env ----------------------------------------------------------------------------------
VENV="${FDP_VENV:-$ROOT/.venv}"
PY=""
if [ -n "${FDP_PYTHON:-}" ]; then
    PY="$FDP_PYTHON"
elif [ -x "$VENV/bin/python" ] && has_torch "$VENV/bin/python"; then
    PY="$VENV/bin/python"
elif command -v python3 >/dev/null && has_torch python3; then
    PY="$(command -v python3)"
else
    stage setup 90 python3 dev.py setup
    [ -x "$VENV/bin/python" ] && PY="$VENV/bin/python"
fi

ENV_PY='import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "| built for CUDA", torch.version.cuda)
ok = torch.cuda.is_available()
print("torch.cuda.is_available()", ok)
if ok:
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.device_count(), "x", p.name, f"{p.total_memory / 2**30:.0f} GiB",
          "| nccl", torch.distributed.is_nccl_available())
import fdp
print("fdp", fdp.__version__, fdp.__file__)
sys.exit(0 if ok else 3)'
CUDA=no
if [ -z "$PY" ] || ! has_torch "$PY"; then
    skip env "no Python with torch found (set FDP_PYTHON)"
else
    stage env 60 "$PY" -c "$ENV_PY"
    cp "$OUT_DIR/env.log" "$OUT_DIR/env.txt"
    grep -q "torch.cuda.is_available() True" "$OUT_DIR/env.log" && CUDA=yes
fi

# --- tests, marked, bench -------------------------------------------------------------------
if [ -z "$PY" ] || ! has_torch "$PY"; then
    skip tests "no torch"; skip marked "no torch"; skip bench "no torch"
elif ! "$PY" -c "import pytest, hypothesis" >/dev/null 2>&1; then
    skip tests "pytest or hypothesis missing in $PY"; skip marked "pytest missing"
else
    stage tests 150 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py \
        tests/test_bench_cuda.py
    # exit code 5: nothing else is marked cuda, which is fine
    stage marked 90 bash -c '"$0" -m pytest -q -p no:cacheprovider -rs -m cuda tests \
        --ignore=tests/test_cuda.py --ignore=tests/test_bench_cuda.py; rc=$?; \
        [ $rc -eq 5 ] && exit 0; exit $rc' "$PY"
fi
if [ -n "$PY" ] && has_torch "$PY"; then
    if [ "$CUDA" = yes ]; then
        stage bench 240 "$PY" -m fdp.bench --device cuda --quick \
            --json "$OUT_DIR/bench-cuda.json"
    else  # the refusal itself is checked: a clear message and a non-zero exit
        skip bench "torch.cuda.is_available() is False"
    fi
fi

# --- summary ------------------------------------------------------------------------------
{
    echo "SUMMARY of scripts/device-check.sh ($(date -u +%Y-%m-%dT%H:%M:%SZ), $((SECONDS - START)) s)"
    echo "python: ${PY:-none} | CUDA available: $CUDA | results: $OUT_DIR"
    [ -f "$OUT_DIR/env.txt" ] && sed 's/^/  /' "$OUT_DIR/env.txt"
    for line in "${SUMMARY[@]}"; do echo "$line"; done
    if [ -f "$OUT_DIR/bench.log" ]; then
        echo "bench ratios (fdp / plain or DDP):"
        grep -E '^(eager|sweep|compile|memory|distributed) ' "$OUT_DIR/bench.log" | sed 's/^/  /'
    fi
    [ $FAILED -eq 0 ] && echo "ALL STAGES PASSED" || echo "SOME STAGES FAILED OR WERE SKIPPED"
} | tee "$OUT_DIR/summary.txt"
exit $FAILED
