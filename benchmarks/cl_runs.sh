#!/usr/bin/env bash
# The strategy comparison's runs in one go (BENCHMARKS.md, "The composed pipeline" and "A second
# order"): both orders; seq-lora, composed with a fold after task 2 and multitask for each seed
# of SEEDS; inc-lora, o-lora, am-lora and composed without a fold for the first seed. One
# `strata bench` process per run, at most JOBS at once, each in OUT/<order>-<method>-s<seed>/
# with its log beside it; then one line per run (ACC, BWT, and whether the fold was published).
# Meant for a GPU (DEVICE=cuda JOBS=8 or more) or a long background job on CPUs (JOBS=cores).
#
#   benchmarks/cl_runs.sh OUT
#
# Environment (defaults): CL_DATA (../shared/data/cl_benchmark), ORDER2 (OUT/order2-data, made
# from CL_DATA), DEVICE (cpu), JOBS (2), THREADS (1 per run), MODEL (smollm2), TRAIN (500),
# EVAL (200), SEEDS ("0 1"), PYTHON (.venv/bin/python).
set -uo pipefail
OUT=${1:?usage: benchmarks/cl_runs.sh OUT}
CL_DATA=${CL_DATA:-../shared/data/cl_benchmark}
ORDER2=${ORDER2:-$OUT/order2-data}
PY=${PYTHON:-.venv/bin/python}
SEEDS=${SEEDS:-0 1}
mkdir -p "$OUT"
[ -d "$ORDER2" ] || "$PY" benchmarks/unrelated_order.py --data "$CL_DATA" --out "$ORDER2" || exit 1
declare -A ORDER=([o1]="--data $CL_DATA --order dbpedia,amazon,agnews,yelp"
                  [o2]="--data $ORDER2 --order agnews,yelp,color,animal")
COMMON=(--model "${MODEL:-smollm2}" --train-per-task "${TRAIN:-500}" --eval-per-task "${EVAL:-200}"
        --device "${DEVICE:-cpu}" --set learning_rate=1e-3 --set epochs=1 --set batch_size=8
        --set max_length=128)
runs=()
for seed in $SEEDS; do
    for o in o1 o2; do
        runs+=("$o-seq-lora-s$seed|$o|--seed $seed --methods seq-lora")
        runs+=("$o-fold-s$seed|$o|--seed $seed --methods composed --consolidate-after 2")
        runs+=("$o-multitask-s$seed|$o|--seed $seed --methods multitask")
    done
done
first=${SEEDS%% *}
for m in inc-lora o-lora am-lora composed; do
    for o in o1 o2; do runs+=("$o-$m-s$first|$o|--seed $first --methods $m"); done
done
for run in "${runs[@]}"; do
    IFS='|' read -r name o args <<< "$run"
    while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-2}" ]; do sleep 2; done
    # shellcheck disable=SC2086  # the order's and the run's arguments are word lists
    ( OMP_NUM_THREADS=${THREADS:-1} "$PY" -m api.cli bench ${ORDER[$o]} "${COMMON[@]}" $args \
        --out "$OUT/$name" > "$OUT/$name.log" 2>&1 || echo "failed, see $OUT/$name.log" ) &
    echo "$(date +%T) started $name"
done
wait
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("*/results.json")):
    for m in json.loads(path.read_text())["methods"]:
        folds = ["published" if f["published"] else "refused" for f in m.get("folds") or []]
        bwt = m["backward_transfer"]
        print(f"{path.parent.name:24} ACC {100 * m['average_accuracy']:5.1f}  BWT "
              f"{'n/a' if bwt is None else f'{100 * bwt:+5.1f}'}  {' '.join(folds)}")
PY
