"""Per-frame 68-point landmarks of videos and frame folders, saved as sidecar files.

For ``<dir>/<stem>.mp4`` (or ``.gif``, ``.mov``, a folder ``<dir>/<stem>/`` of frames) this writes
``<stem>.landmarks.npy`` beside it (or in ``--output``, keeping the relative layout): float32
``T x 68 x 2`` in pixel-index coordinates (x, y; ``modules/coords.py``), one row per frame, and a
row of NaN for a frame where no face was found -- recorded as missing, never a crash. Frames are
streamed; only the small landmark array is kept in memory.

Resumable: each sidecar is written to a temp file and renamed when complete, so an existing
sidecar is a finished one and is skipped (``--overwrite`` redoes it). A corrupt or unreadable input
is logged and skipped.

    python tools/extract_landmarks.py --input vox/test --backend auto   # FAN, else dlib
"""
import argparse
import logging
import os
import sys

import numpy as np
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules.backends import Skipped, first_available  # noqa: E402
from datasets.video_io import VideoReader  # noqa: E402
from tools import video_io  # noqa: E402
from tools.video_io import exit_status, for_each_video, write_atomically  # noqa: E402

log = logging.getLogger("tools.extract_landmarks")
SUFFIX = ".landmarks.npy"


def sidecar_path(path, input_root, output_root=None):
    """Where the landmarks of video or frame folder ``path`` go."""
    return video_io.sidecar_path(path, input_root, output_root, SUFFIX)


def landmarks_of(path, landmarker, batch_size=8, progress=False):
    """``T x 68 x 2`` float32 landmarks of one video or frame folder (NaN rows: no face)."""
    source = VideoReader(path)
    rows, batch = [], []
    frames = tqdm(source, total=len(source), desc=os.path.basename(path), unit="frame",
                  leave=False, disable=not progress)
    for frame in frames:
        batch.append(frame)
        if len(batch) == batch_size:
            rows.append(landmarker(np.stack(batch)))
            batch = []
    if batch:
        rows.append(landmarker(np.stack(batch)))
    if not rows:
        raise ValueError("no frame could be read")
    return np.concatenate(rows).astype(np.float32)


def save_atomically(path, array):
    write_atomically(path, lambda handle: np.save(handle, array))


def extract_folder(input_path, landmarker, output_root=None, overwrite=False, batch_size=8,
                   progress=True):
    """Landmark sidecars for every input below ``input_path``; returns ``{input: status}`` where
    status is ``'done'``, ``'skipped'`` (already there) or ``'error: ...'``."""

    def process(path, target):
        points = landmarks_of(path, landmarker, batch_size, progress)
        missing = int((~np.isfinite(points).all(axis=(1, 2))).sum())
        if missing:
            log.info("%s: no face in %d of %d frames (NaN rows)", path, missing, len(points))
        save_atomically(target, points)

    return for_each_video(input_path, lambda path: sidecar_path(path, input_path, output_root),
                          lambda path, target: os.path.isfile(target) and not overwrite,
                          process, log, progress)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="a video, a frame folder or a folder of them")
    parser.add_argument("--output", default=None, help="sidecar folder (default: beside each input)")
    parser.add_argument("--backend", default="auto", choices=["auto", "fan", "dlib"],
                        help="auto: FAN if its weights are in the torch hub cache, else dlib")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = ("fan", "dlib") if args.backend == "auto" else (args.backend,)
    landmarker = first_available("landmarks", names, device=args.device)
    if isinstance(landmarker, Skipped):
        log.error("landmark backend %s unavailable: %s", args.backend, landmarker.reason)
        return 2
    log.info("landmarks: %s", landmarker.name)
    summary = extract_folder(args.input, landmarker, args.output, args.overwrite, args.batch_size,
                             progress=not args.no_progress)
    return exit_status(log, summary, args.input)


if __name__ == "__main__":
    sys.exit(main())
