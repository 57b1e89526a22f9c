#!/usr/bin/env bash
# The device checks of a GPU machine as one prepared script: `spat doctor`, then `spat bench`,
# each under its own time limit, their JSON, markdown and logs in OUT.
#
#   bash scripts/device_check.sh OUT [DEVICE]     DEVICE: cuda (default), cuda:N, or cpu
#
# Run from the repository root. spatlib is used from the checkout (PYTHONPATH), so nothing is
# installed: the machine needs torch, numpy, pyyaml and tqdm (spat doctor and spat bench use no
# papermill, nbval or pyautoattack), and torchvision for the bench's reference loop (without it
# the bench runs with --no-reference). Wheels of what it lacks can be put in $SPAT_WHEELS (a
# folder): they are installed offline first.
#
# Limits (seconds): SPAT_DOCTOR_LIMIT (default 300), SPAT_BENCH_LIMIT (default 420); arguments
# for the bench in SPAT_BENCH_ARGS (default, on CUDA: every model and method, slices of 10
# batches, median of 3, the floor at fp32 too); for a rehearsal on a CPU, e.g.
#   SPAT_BENCH_ARGS="--models small_cnn --batch-size 8 --batches 1 --repeats 1 --warmup 0" \
#       bash scripts/device_check.sh /tmp/check cpu
# A step that fails or runs out of time is recorded in OUT/status.txt and the next one still
# runs; the exit status is 0 only when both passed.
set -uo pipefail

out=${1:?usage: bash scripts/device_check.sh OUT [DEVICE]}
device=${2:-cuda}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

if [[ -n ${SPAT_WHEELS:-} ]]; then
    "$PY" -m pip install --no-index --no-deps --quiet "$SPAT_WHEELS"/*.whl ||
        echo "device_check: installing the wheels in $SPAT_WHEELS failed" >&2
fi

# the machine first (the kit's provenance record and the hardware), also when the checks fail
"$PY" - "$out/machine.json" "$device" <<'EOF'
import json, sys
import torch
from spatlib.device.machine import machine_info
from spatlib.util import resolve_device
try:
    device, error = resolve_device(sys.argv[2], key="DEVICE"), None
except ValueError as e:    # a device that is not there: the CPU's record, and why
    device, error = torch.device("cpu"), str(e)
info = {**machine_info(device), **({"device_error": error} if error else {})}
open(sys.argv[1], "w").write(json.dumps(info, indent=2) + "\n")
print("device_check:", json.dumps(info))
EOF

if [[ $device == cuda* ]]; then
    default_bench="--batches 10 --repeats 3 --floor-precision fp32"
else
    default_bench=""
fi
# shellcheck disable=SC2206  # word splitting of the argument string is the point
bench_args=(${SPAT_BENCH_ARGS:-$default_bench})
if ! "$PY" -c "import torchvision, PIL" 2>/dev/null; then
    # the reference loop is written with torchvision's transforms, as public code is
    echo "device_check: no torchvision here (put its wheel in \$SPAT_WHEELS): bench without the reference loop" >&2
    bench_args+=(--no-reference)
fi

status=0
: >"$out/status.txt"
step() {   # step NAME LIMIT COMMAND...: run it, log it, record its exit code
    local name=$1 limit=$2 code
    shift 2
    echo "device_check: $name (at most $limit s)" >&2
    timeout --kill-after=20 "$limit" "$@" >"$out/$name.out" 2>"$out/$name.err"
    code=$?
    [[ $code == 124 || $code == 137 ]] && echo "device_check: $name ran past $limit s" >&2
    echo "$name $code" >>"$out/status.txt"
    cat "$out/$name.out"
    [[ $code == 0 ]] || { status=1; tail -5 "$out/$name.err" >&2; }
}
step doctor "${SPAT_DOCTOR_LIMIT:-300}" "$PY" -m spatlib.cli doctor --device "$device" \
    --out "$out/doctor.json" --quiet
step bench "${SPAT_BENCH_LIMIT:-420}" "$PY" -m spatlib.cli bench --device "$device" \
    --out "$out/bench.json" --quiet "${bench_args[@]}"
cat "$out/status.txt"
exit $status
