#!/usr/bin/env bash
# The speed goals checked on one GPU, in one table (docs/performance.md):
#   training and animation of vox-fomm.yaml (FOMM) and vox.yaml (SAFA) at 256x256, in fp32 and in
#   bf16 + channels_last, then compiled bf16 FOMM, then the training loader alone (mp4 and frame
#   folders, synthetic 256 px videos it builds under data/gpu_check) against a FOMM step.
#
#     bash benchmarks/gpu_check.sh                 # PYTHON=... to choose the interpreter
#     GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh   # tiny configs on the CPU: tests the script
#
# Budget: at most 10 minutes: every run has its own time limit (600 s in all; expected about half
# of that on an H100/H200), and a run that fails or times out becomes a table row saying so, so
# the table always prints. Weights are random (the speed is the same).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
ROWS=$(mktemp)
LOG=${GPU_CHECK_LOG:-gpu_check.log}
: > "$LOG"

run() {   # run LIMIT_SECONDS NAME COMMAND...: rows to $ROWS, everything else to $LOG
    local limit=$1 name=$2
    shift 2
    echo "== $name: $*" >> "$LOG"
    local out
    out=$(timeout "$limit" "$@" 2>>"$LOG")
    local status=$?
    echo "$out" >> "$LOG"
    if [ $status -eq 0 ]; then
        echo "$out" | grep '^| ' >> "$ROWS"
    else
        echo "| $name | failed (exit $status, see $LOG) | | | | | | | | | |" >> "$ROWS"
    fi
}

FOMM=vox-fomm.yaml SAFA=vox.yaml FOMM_BATCH=32 SAFA_BATCH=16 SIZE=256 DEVICE=cuda SCALE=1
T="--warmup 3 --iters 10 --runs 3 --rows_only"
A="--frames 2048 --batch_size 64 --warmup 2 --rows_only"
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then   # the same runs, CPU-sized, to test this script
    FOMM=tiny-fomm.yaml SAFA=tiny-safa.yaml FOMM_BATCH=2 SAFA_BATCH=2 SIZE=32 DEVICE=cpu SCALE=20
    SMALL="--device cpu --set dataset_params.frame_shape=[32,32,3]"
    T="--warmup 0 --iters 1 --runs 1 --rows_only $SMALL"
    A="--frames 4 --batch_size 2 --warmup 0 --rows_only $SMALL"
fi
run $((60 * SCALE)) "train $FOMM fp32" $PY benchmarks/train_speed.py --config $FOMM --batch_size $FOMM_BATCH --precision fp32 $T
run $((60 * SCALE)) "train $FOMM bf16" $PY benchmarks/train_speed.py --config $FOMM --batch_size $FOMM_BATCH --precision bf16 --channels_last $T
run $((90 * SCALE)) "train $SAFA fp32" $PY benchmarks/train_speed.py --config $SAFA --batch_size $SAFA_BATCH --precision fp32 $T
run $((90 * SCALE)) "train $SAFA bf16" $PY benchmarks/train_speed.py --config $SAFA --batch_size $SAFA_BATCH --precision bf16 --channels_last $T
run $((35 * SCALE)) "animate $FOMM fp32" $PY benchmarks/animate_speed.py --config $FOMM --precision fp32 $A
run $((35 * SCALE)) "animate $FOMM bf16" $PY benchmarks/animate_speed.py --config $FOMM --precision bf16 --channels_last $A
run $((35 * SCALE)) "animate $SAFA fp32" $PY benchmarks/animate_speed.py --config $SAFA --precision fp32 $A
run $((35 * SCALE)) "animate $SAFA bf16" $PY benchmarks/animate_speed.py --config $SAFA --precision bf16 --channels_last $A
if [ "${GPU_CHECK_SMOKE:-0}" != 1 ]; then   # inductor needs minutes of compiling on a CPU
    run 100 "train $FOMM bf16 compiled" $PY benchmarks/train_speed.py --config $FOMM --batch_size $FOMM_BATCH --precision bf16 --channels_last --compile $T
fi
run $((60 * SCALE)) "loader ${SIZE}px" $PY benchmarks/data_speed.py --root data/gpu_check_$SIZE --size $SIZE --videos 4 --frames 40 --workers 0 8 --batch_size $FOMM_BATCH --batches 6 --repeats 2 --device $DEVICE --rows_only

echo "GPU: $($PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "none")' 2>/dev/null)"
echo "Items: generated images (train), driving frames (animate), training pairs (loader). FLOPs by"
echo "torch's FLOP counter; utilization against the GPU's dense peak (fp32: TF32). Details: $LOG"
echo
$PY -c "import sys; sys.path.insert(0, '.'); from benchmarks.flops import print_table; print_table([])"
cat "$ROWS"
rm -f "$ROWS"
