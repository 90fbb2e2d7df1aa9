#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: virtual environment, requirements,
# the synthetic talking-head dataset (generated on first use), SAFA's 3DMM encoder pretrained
# briefly, a short CPU-sized SAFA training run, the same-identity reconstruction of the test
# videos, and a real portrait (scikit-image's astronaut) animated by a synthetic driving video.
# Outputs land in log/demo-pretrain/ and log/demo/. Re-running resumes finished or killed runs.
#   CONFIG=tiny-fomm.yaml bash tools/demo.sh      # FOMM instead (no 3DMM pretraining)
#   bash tools/demo.sh --set train_params.num_epochs=1   # extra args go to the training run
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
CONFIG=${CONFIG:-tiny-safa.yaml}
RUN=log/demo
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -r requirements.txt
"$VENV/bin/python" -m pip install -q --no-deps -r requirements-nodeps.txt
PY="$VENV/bin/python"

MODEL=$("$PY" -c "import config; print(config.load_config('$CONFIG')['model'])")
EXTRA=()
if [ "$MODEL" = safa ]; then
  "$PY" run.py --config tiny-pretrain-3dmm.yaml --mode train --run_name demo-pretrain
  EXTRA=(--set "model_params.tdmm_params.checkpoint=log/demo-pretrain/checkpoint_latest.pth")
fi
"$PY" run.py --config "$CONFIG" --mode train --run_name demo "${EXTRA[@]}" "$@"
"$PY" run.py --config "$CONFIG" --mode reconstruction --checkpoint "$RUN/checkpoint_latest.pth" "${EXTRA[@]}"
"$PY" - "$RUN/astronaut.png" <<'PY'
import sys
import imageio.v2 as imageio
import skimage.data
imageio.imwrite(sys.argv[1], skimage.data.astronaut())
PY
ROOT=$("$PY" -c "import config; print(config.load_config('$CONFIG')['dataset_params']['root_dir'])")
DRIVING=$(find "$ROOT/test" -mindepth 1 -maxdepth 1 -type d | sort | head -n 1)
"$PY" run.py --config "$CONFIG" --mode animate --checkpoint "$RUN/checkpoint_latest.pth" \
    --source_image "$RUN/astronaut.png" --driving_video "$DRIVING" \
    --result_video "$RUN/astronaut.mp4" --find_best_frame "${EXTRA[@]}"
echo "demo outputs: $RUN (visuals/, reconstruction/, astronaut.mp4)"
