#!/usr/bin/env bash
# One short, prepared run on a GPU machine: the fast path measured, then a full-resolution PG2
# trained for the minutes left and brought back as a checkpoint small enough to bundle.
#
#   bash training/gpu_check.sh prepare DATA_DIR   # here, before: wheels the GPU machine lacks (.whl/) and
#                                                 # a ≤ 40 MiB copy of a synthetic set (data/gpu/)
#   bash training/gpu_check.sh bench              # on the GPU (≈ 4 min): pg2-server bench --sweep and
#                                                 # pg2-train bench, into $OUT
#   bash training/gpu_check.sh train              # on the GPU (≈ 6 min): stage 1, stage 2, fp16 export,
#                                                 # eval on the carried test split, into $OUT
#   bash training/gpu_check.sh compare CKPT.json DATA_DIR OUT_DIR
#                                                 # back here: CKPT and the bundled model on DATA_DIR/test
#
# The GPU machine runs its own python3 and torch, has no network and lacks pyzmq: `prepare`
# downloads the wheels it needs; each GPU command carries `.whl` and `data/gpu` and installs
# the wheels into /tmp/site. The project is used from the working tree (PYTHONPATH), not installed.
# Every knob below is an environment variable, so the same script runs on the CPU at tiny scale
# (tests/test_gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-data/gpu}                          # what `prepare` wrote
WHEELS=${WHEELS:-.whl}                          # wheels for the GPU machine (prepare writes them)
# bench
SWEEP_PRESETS=${SWEEP_PRESETS:-market,deepfashion}
SWEEP_BATCHES=${SWEEP_BATCHES:-1,8,32,64}
SERVE_PRESET=${SERVE_PRESET:-deepfashion}
COMPILE=${COMPILE:-default}                     # max-autotune tunes every bucket for minutes: too slow here
CLIENTS=${CLIENTS:-64}
REQUESTS=${REQUESTS:-0}
ROUNDS=${ROUNDS:-1}                             # served runs, each between two raw runs
SWEEP_ROUNDS=${SWEEP_ROUNDS:-3}                 # the paths take turns; each row is the median
TRAIN_BENCH_PRESET=${TRAIN_BENCH_PRESET:-deepfashion}
TRAIN_BENCH_BATCH=${TRAIN_BENCH_BATCH:-16}
TRAIN_BENCH_STEPS=${TRAIN_BENCH_STEPS:-20}
BENCH_SECONDS=${BENCH_SECONDS:-200}             # each of the two benchmarks is cut off after this
# train
PRESET=${PRESET:-fashion}                       # 256×176, the DeepFashion frame at full resolution
WIDTH=${WIDTH:-auto}                            # auto: the largest whose fp16 checkpoint fits MAX_MIB
MAX_MIB=${MAX_MIB:-15}                          # a file coming back from the GPU machine: ≤ 16 MiB
STAGE1_SECONDS=${STAGE1_SECONDS:-170}
STAGE2_SECONDS=${STAGE2_SECONDS:-110}
STEPS1=${STEPS1:-1000000}                       # stages end by time unless these are smaller
STEPS2=${STEPS2:-1000000}
BATCH=${BATCH:-32}
LR=${LR:-2e-4}
LAMBDA=${LAMBDA:-50}
WORKERS=${WORKERS:-12}
EVAL_PAIRS=${EVAL_PAIRS:-400}
MAX_DATA_MIB=${MAX_DATA_MIB:-40}

export PYTHONUNBUFFERED=1
pg2_server() { "$PYTHON" -m pg2_server.cli "$@"; }
pg2_train() { "$PYTHON" -m training.cli "$@"; }

# The GPU machine: carried wheels, the working tree on the path, a result folder.
setup_device() {
    OUT=${OUT:?set OUT to the folder whose files come back}
    mkdir -p "$OUT"
    local site=/tmp/site
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl
        export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    { date -u; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; "$PYTHON" -c "import torch; print('torch', torch.__version__)"; } \
        > "$OUT/machine.txt" 2>&1
}

cmd_prepare() {
    local source=${1:?usage: gpu_check.sh prepare DATA_DIR (a pg2-train synth folder)}
    mkdir -p .whl
    # pyzmq is the one runtime dependency the GPU image lacks (its python3 is 3.12).
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "pyzmq>=25"
    "$PYTHON" -m training.gpu_data "$source" "$DATA" --max-mib "$MAX_DATA_MIB"
    du -sh .whl "$DATA"
}

cmd_bench() {
    setup_device
    set +e  # one benchmark that fails or runs out of time must not cost the other its figures
    timeout -s INT "$BENCH_SECONDS" "$PYTHON" -m pg2_server.cli bench --device "$DEVICE" --sweep \
        --presets "$SWEEP_PRESETS" --batch-sizes "$SWEEP_BATCHES" --preset "$SERVE_PRESET" --random-weights \
        --dtype bfloat16 --fast --compile "$COMPILE" --clients "$CLIENTS" --requests "$REQUESTS" --rounds "$ROUNDS" --sweep-rounds "$SWEEP_ROUNDS" \
        2>&1 | tee "$OUT/bench-server.txt"
    timeout -s INT "$BENCH_SECONDS" "$PYTHON" -m training.cli bench --preset "$TRAIN_BENCH_PRESET" --stage 1 2 \
        --batch-size "$TRAIN_BENCH_BATCH" --steps "$TRAIN_BENCH_STEPS" --device "$DEVICE" 2>&1 | tee "$OUT/bench-train.txt"
    set -e
}

largest_width() {
    "$PYTHON" - "$PRESET" "$MAX_MIB" <<'PY'
import sys

import torch

from pg2_server.model import Generator1, Generator2, parameter_count, preset

name, max_mib = sys.argv[1], float(sys.argv[2])
best = None
for width in range(4, 513, 4):
    config = preset(name, base_width=width)
    with torch.device("meta"):
        params = parameter_count(Generator1(config)) + parameter_count(Generator2(config))
    if 2 * params > max_mib * 2 ** 20:  # fp16: two bytes a parameter
        break
    best = (width, params)
if best is None:
    sys.exit(f"preset {name}: even width 4 does not fit {max_mib} MiB")
print(best[0])
print(f"width {best[0]}: {best[1] / 1e6:.2f} M parameters, {2 * best[1] / 2 ** 20:.1f} MiB in fp16", file=sys.stderr)
PY
}

# Train one stage for at most SECONDS: SIGTERM makes pg2-train save its state and exit 143.
fit_for() {
    local stage=$1 seconds=$2 steps=$3 rc=0
    shift 3
    timeout -s TERM "$seconds" "$PYTHON" -m training.cli fit --preset "$PRESET" --width "$WIDTH" --stage "$stage" \
        --data-root "$DATA/train" --annotations "$DATA/annotation-train.csv" --pairs "$DATA/pairs-train.csv" \
        --out "$RUN" --steps "$steps" --batch-size "$BATCH" --lr "$LR" --workers "$WORKERS" --device "$DEVICE" \
        --save-every 1000000 --sample-every 250 "$@" || rc=$?
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && [ "$rc" -ne 143 ]; then
        echo "stage $stage failed (exit $rc)" >&2
        return "$rc"
    fi
}

cmd_train() {
    setup_device
    [ -f "$DATA/pairs-train.csv" ] || { echo "no $DATA/pairs-train.csv: run 'gpu_check.sh prepare DATA_DIR' first" >&2; exit 2; }
    [ "$WIDTH" = auto ] && WIDTH=$(largest_width)
    RUN=${RUN:-/tmp/pg2-gpu-run}
    rm -rf "$RUN"
    {
        fit_for 1 "$STAGE1_SECONDS" "$STEPS1"
        fit_for 2 "$STAGE2_SECONDS" "$STEPS2" --lambda-l1 "$LAMBDA"
    } 2>&1 | tee "$OUT/train.txt"
    pg2_train export "$RUN" --out "$OUT/pg2_gpu" --dtype float16
    pg2_train eval --checkpoint "$OUT/pg2_gpu.json" --data-root "$DATA/test" --annotations "$DATA/annotation-test.csv" \
        --pairs "$DATA/pairs-test.csv" --out "$RUN/eval" --device "$DEVICE" --limit "$EVAL_PAIRS" --no-images \
        2>&1 | tee -a "$OUT/train.txt"
    pg2_train export "$RUN" --out "$OUT/pg2_gpu" --dtype float16 --metrics "$RUN/eval/metrics.json"
    cp "$RUN/eval/metrics.md" "$OUT/metrics.md"
    local last
    last=$(ls "$RUN"/samples/stage2-step*.png 2>/dev/null | tail -n 1 || true)
    [ -n "$last" ] && cp "$last" "$OUT/samples.png"
    ls -la "$OUT"
}

cmd_compare() {
    local checkpoint=${1:?usage: gpu_check.sh compare CKPT.json DATA_DIR OUT_DIR} data=${2:?DATA_DIR} out=${3:?OUT_DIR}
    local csv="$data/fasion-resize"
    for name in bundled trained; do
        local ckpt=$checkpoint
        [ "$name" = bundled ] && ckpt=pg2_server/default/pg2_default.json
        pg2_train eval --checkpoint "$ckpt" --data-root "$data/test" --annotations "$csv-annotation-test.csv" \
            --pairs "$csv-pairs-test.csv" --out "$out/$name" --device "${COMPARE_DEVICE:-cpu}" --no-images
    done
    echo "bundled: $out/bundled/metrics.md; trained: $out/trained/metrics.md"
}

case "${1:-}" in
    prepare) shift; cmd_prepare "$@" ;;
    bench) cmd_bench ;;
    train) cmd_train ;;
    compare) shift; cmd_compare "$@" ;;
    *) echo "usage: bash training/gpu_check.sh prepare DATA_DIR | bench | train | compare CKPT.json DATA_DIR OUT_DIR" >&2
       exit 2 ;;
esac
