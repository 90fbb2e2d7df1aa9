"""Per-frame face landmarks of videos and frame folders, saved as sidecar files.

For ``<dir>/<stem>.mp4`` (or ``.gif``, ``.mov``, a folder ``<dir>/<stem>/`` of frames) this writes
``<stem>.landmarks.npy`` beside it (or in ``--output``, keeping the relative layout): float32
``T x N x 2`` in pixel-index coordinates (x, y; ``modules/coords.py``), one row per frame, and a
row of NaN for a frame where no face was found -- recorded as missing, never a crash. Frames are
streamed; only the small landmark array is kept in memory.

Detectors: a backend (``--backend``: FAN, dlib; 68 points), or ``--detector CHECKPOINT``, a
trained ``landmarks`` model (FAN + DSNT + SBR, ``modules/models/landmarks.py``; 74 or 68 points as
trained). Tracks can be smoothed over time with a One-Euro filter (``modules/one_euro.py``, on
normalized coordinates, so its settings do not depend on the frame size; on by default with
``--detector``, ``--smooth`` / ``--no-smooth`` choose); frames without a face stay NaN. The
default settings (cut-off 4 Hz at rest, speed coefficient 40 per normalized unit per second) were
chosen on the synthetic data with a trained detector: NME within 1% of the raw tracks', half of
the second-difference energy (SMS) above the true motion's removed.

Resumable: each sidecar is written to a temp file and renamed when complete, so an existing
sidecar is a finished one and is skipped (``--overwrite`` redoes it). A corrupt or unreadable input
is logged and skipped.

    python tools/extract_landmarks.py --input vox/test --backend auto   # FAN, else dlib
    python tools/extract_landmarks.py --input vox/test --detector log/landmarks/checkpoint.pth
"""
import argparse
import logging
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules.backends import Skipped, first_available  # noqa: E402
from modules.coords import normalized_to_pixels, pixels_to_normalized  # noqa: E402
from modules.one_euro import smooth_sequence  # noqa: E402
from datasets.video_io import VideoReader  # noqa: E402
from tools import video_io  # noqa: E402
from tools.video_io import exit_status, for_each_video, write_atomically  # noqa: E402

log = logging.getLogger("tools.extract_landmarks")
SUFFIX = ".landmarks.npy"


def sidecar_path(path, input_root, output_root=None):
    """Where the landmarks of video or frame folder ``path`` go."""
    return video_io.sidecar_path(path, input_root, output_root, SUFFIX)


def landmarks_of(path, landmarker, batch_size=8, progress=False, smoothing=None):
    """``T x N x 2`` float32 landmarks of one video or frame folder (NaN rows: no face).

    ``landmarker``: uint8 frames ``B x H x W x 3`` -> ``B x N x 2`` pixels; ``smoothing``: One-Euro
    parameters (``min_cutoff``, ``beta``, ``d_cutoff``, optional ``fps``) or None."""
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
    points = np.concatenate(rows).astype(np.float32)
    if smoothing:
        points = smooth_track(points, frame.shape[:2], source.fps, **smoothing)
    return points


def smooth_track(points, frame_size, video_fps=None, fps=None, **one_euro):
    """A landmark track ``T x N x 2`` (pixels of ``frame_size`` (H, W) frames) smoothed over time
    by a One-Euro filter on normalized coordinates, at the video's frame rate (``fps`` overrides
    it; 25 when neither is known); NaN rows stay NaN."""
    found = np.isfinite(points).all(axis=(1, 2))
    if not found.any():
        return points
    normalized = pixels_to_normalized(points.astype(np.float64), *frame_size)
    smoothed = smooth_sequence(normalized, fps or video_fps or 25.0, valid=found, **one_euro)
    smoothed = normalized_to_pixels(smoothed, *frame_size)
    smoothed[~found] = np.nan
    return smoothed.astype(np.float32)


def pixel_landmarker(landmarker, device="cpu"):
    """A :class:`modules.landmark_sources.Landmarker` (tensor images in, normalized landmarks
    out) as a landmarker of uint8 frames ``B x H x W x 3`` giving pixels, what this tool takes."""
    from datasets.frames_dataset import image_to_tensor

    def detect(frames):
        images = torch.stack([image_to_tensor(f) for f in frames]).to(device)
        with torch.no_grad():
            points = landmarker(images).cpu().numpy()
        return normalized_to_pixels(points, *frames.shape[1:3])
    detect.name = landmarker.name
    return detect


def checkpoint_pixel_landmarker(path, device="cpu"):
    """A trained ``landmarks`` model as a landmarker of uint8 frames (pixels out)."""
    from modules.landmark_sources import checkpoint_landmarker
    return pixel_landmarker(checkpoint_landmarker(path, device), device)


def save_atomically(path, array):
    write_atomically(path, lambda handle: np.save(handle, array))


def extract_folder(input_path, landmarker, output_root=None, overwrite=False, batch_size=8,
                   progress=True, smoothing=None):
    """Landmark sidecars for every input below ``input_path``; returns ``{input: status}`` where
    status is ``'done'``, ``'skipped'`` (already there) or ``'error: ...'``."""

    def process(path, target):
        points = landmarks_of(path, landmarker, batch_size, progress, smoothing)
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
    parser.add_argument("--detector", default=None, metavar="CHECKPOINT",
                        help="a trained landmarks model checkpoint instead of --backend")
    parser.add_argument("--smooth", default=None, action=argparse.BooleanOptionalAction,
                        help="One-Euro smoothing of each track (default: on with --detector)")
    parser.add_argument("--min-cutoff", type=float, default=4.0,
                        help="One-Euro cut-off at rest (Hz)")
    parser.add_argument("--beta", type=float, default=40.0,
                        help="One-Euro speed coefficient (per normalized unit per second; the "
                        "frame spans 2 units)")
    parser.add_argument("--d-cutoff", type=float, default=1.0, help="One-Euro speed cut-off (Hz)")
    parser.add_argument("--fps", type=float, default=None,
                        help="frame rate for smoothing (default: the video's, else 25)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.detector:
        try:
            landmarker = checkpoint_pixel_landmarker(args.detector, args.device)
        except (OSError, ValueError, RuntimeError) as error:
            log.error("%s", error)
            return 2
    else:
        names = ("fan", "dlib") if args.backend == "auto" else (args.backend,)
        landmarker = first_available("landmarks", names, device=args.device)
        if isinstance(landmarker, Skipped):
            log.error("landmark backend %s unavailable: %s", args.backend, landmarker.reason)
            return 2
    smooth = bool(args.detector) if args.smooth is None else args.smooth
    smoothing = {"min_cutoff": args.min_cutoff, "beta": args.beta, "d_cutoff": args.d_cutoff,
                 "fps": args.fps} if smooth else None
    log.info("landmarks: %s%s", landmarker.name, ", One-Euro smoothed" if smoothing else "")
    summary = extract_folder(args.input, landmarker, args.output, args.overwrite, args.batch_size,
                             progress=not args.no_progress, smoothing=smoothing)
    return exit_status(log, summary, args.input)


if __name__ == "__main__":
    sys.exit(main())
