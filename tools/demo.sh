#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: virtual environment, requirements,
# synthetic talking-head dataset (generated on first use), a short CPU-sized training run, the
# same-identity reconstruction of the test videos, and a real portrait (scikit-image's astronaut)
# animated by a synthetic driving video. Outputs land in log/demo/.
#   CONFIG=tiny-fomm.yaml bash tools/demo.sh      # another config; extra args go to every run.py call
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
CONFIG=${CONFIG:-tiny-fomm.yaml}
RUN=log/demo
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -r requirements.txt
PY="$VENV/bin/python"

"$PY" run.py --config "$CONFIG" --mode train --run_name demo "$@"
"$PY" run.py --config "$CONFIG" --mode reconstruction --checkpoint "$RUN/checkpoint_latest.pth" "$@"
"$PY" - "$RUN/astronaut.png" <<'PY'
import sys
import imageio.v2 as imageio
import skimage.data
imageio.imwrite(sys.argv[1], skimage.data.astronaut())
PY
ROOT=$("$PY" -c "import config; print(config.load_config('$CONFIG')['dataset_params']['root_dir'])")
DRIVING=$(find "$ROOT/test" -mindepth 1 -maxdepth 1 ! -name '*.npy' ! -name '*.npz' | sort | head -n 1)
"$PY" run.py --config "$CONFIG" --mode animate --checkpoint "$RUN/checkpoint_latest.pth" \
    --source_image "$RUN/astronaut.png" --driving_video "$DRIVING" \
    --result_video "$RUN/astronaut.mp4" --find_best_frame "$@"
echo "demo outputs: $RUN (visuals/, reconstruction/, astronaut.mp4)"
