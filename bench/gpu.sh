#!/usr/bin/env bash
# The GPU check, under 5 minutes on one GPU: the CUDA-only tests (tests/test_gpu.py), then the
# trainer's img/s by precision, compile mode, batch size and concurrent processes (bench/gpu.py).
#
#   bash bench/gpu.sh [--out FILE] [--cpu-smoke] [--no-tests] [bench/gpu.py options]
#
# --out FILE (or $GPU_BENCH_OUT) receives one JSON line per result, the tests' summary included.
# --cpu-smoke runs everything at tiny sizes on the CPU (the tests skip): it checks the script.
# Needs python3 ($PYTHON) with torch, pyyaml and tqdm; nothing is installed. Where pytest is
# missing, the pure-Python wheels in $PYTEST_WHEELS (pytest and its dependencies) are unpacked
# into a temporary folder on PYTHONPATH.
set -uo pipefail
start=$(date +%s)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
out=${GPU_BENCH_OUT:-}
smoke=""
tests=1
bench_args=()
while [ $# -gt 0 ]; do
    case $1 in
        --out) out=${2:?--out needs a file}; shift 2 ;;
        --cpu-smoke) smoke=--cpu-smoke; shift ;;
        --no-tests) tests=""; shift ;;
        *) bench_args+=("$1"); shift ;;  # e.g. --only step-compiled --seconds 3
    esac
done

if ! $PY -c "import torch, yaml, tqdm" 2>/dev/null; then
    echo "error: $PY cannot import torch, yaml and tqdm (set PYTHON to one that can)" >&2
    exit 2
fi
if [ -z "$smoke" ] && ! $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA device visible: nothing to run (bench/gpu.sh --cpu-smoke checks the script)"
    exit 0
fi
$PY -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|',
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"

tests_rc=0
if [ -n "$tests" ]; then
    echo "== tests/test_gpu.py"
    if ! $PY -c "import pytest" 2>/dev/null && [ -n "${PYTEST_WHEELS:-}" ]; then
        site=$(mktemp -d)
        $PY -c "import glob, sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[2])
            for w in glob.glob(sys.argv[1] + '/*.whl')]" \
            "$PYTEST_WHEELS" "$site"
        export PYTHONPATH="$PYTHONPATH:$site"
    fi
    log=$(mktemp)
    $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$log"
    tests_rc=${PIPESTATUS[0]}
    if [ -n "$out" ]; then
        $PY -c "import json, sys; print(json.dumps({'part': 'tests', 'rc': int(sys.argv[1]),
            'summary': sys.argv[2]}))" "$tests_rc" "$(tail -n 1 "$log")" >> "$out"
    fi
fi

echo "== bench/gpu.py"
# the tests' time counts against the 5 minutes; a setting that would end past this is skipped
$PY bench/gpu.py ${out:+--out "$out"} $smoke --deadline $((start + 285)) "${bench_args[@]}"
bench_rc=$?
exit $((tests_rc || bench_rc))
