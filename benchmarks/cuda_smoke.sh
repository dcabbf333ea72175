#!/usr/bin/env bash
# Every method on a GPU, on the tiny model, each case alone and all at once: learning with a fold
# after task 1, learning with ReLoRA cycles, ReLoRA's rank benchmark, and `strata demo` (training,
# evaluation and consolidation jobs through the job code, STRATA_DEVICE=cuda). About a minute on
# one H200; prints each failing case's last lines and exits non-zero if any failed.
#
#   benchmarks/cuda_smoke.sh DATA [OUT]     DATA: a CL_Benchmark folder with dbpedia, amazon,
#                                           agnews; PYTHON (default .venv/bin/python) runs it,
#                                           DEVICE (default cuda) is the device
set -uo pipefail
DATA=${1:?usage: benchmarks/cuda_smoke.sh DATA [OUT]}
OUT=${2:-bench-results/cuda-smoke}
PY=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu checks the script itself on a machine without a GPU
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT"
T=(--data "$DATA" --order dbpedia,amazon,agnews --model tiny --device "$DEVICE" --train-per-task 16
   --eval-per-task 8 --set epochs=1 --set batch_size=4 --set max_length=64)
case_() {  # name, command...: run it in the background, its log and exit code in $OUT
    local name=$1; shift
    ( timeout 300 "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?" >> "$OUT/$name.log" ) &
}
for m in seq-lora inc-lora o-lora am-lora composed multitask; do
    case_ "fold-$m" "$PY" -m api.cli bench "${T[@]}" --methods $m --consolidate-after 1 \
        --out "$OUT/fold-$m"
    case_ "relora-$m" "$PY" -m api.cli bench "${T[@]}" --methods $m --set relora_every=2 \
        --out "$OUT/relora-$m"
done
case_ demo env STRATA_DEVICE="$DEVICE" "$PY" -m api.cli demo --data-dir "$OUT/demo" --max-drop 100 \
    --train-size 32 --test-size 16
case_ relora_rank "$PY" benchmarks/relora_rank.py --model tiny --data "$DATA" --train 64 \
    --epochs 2 --eval 16 --rank 2 --cycles 3 --device "$DEVICE"
wait
failed=0
for log in "$OUT"/*.log; do
    if [ "$(tail -1 "$log")" = "rc=0" ]; then echo "ok      $(basename "$log" .log)"; continue; fi
    failed=1
    echo "FAILED  $(basename "$log" .log)"
    grep -v '^\s*$' "$log" | tail -15 | sed 's/^/    /'
done
exit $failed
