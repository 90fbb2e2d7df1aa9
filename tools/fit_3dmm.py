"""FLAME codes for every frame of real videos, saved as ``<stem>.flame.npz`` sidecars.

    python -m tools.fit_3dmm --checkpoint log/pretrain-3dmm/checkpoint_latest.pth --input data/vox
    python -m tools.fit_3dmm --checkpoint tdmm.pth --input clip.mp4 --refine-steps 30

For each video (file or frame folder) under ``--input``: the codes of a trained 3DMM encoder (a
'tdmm' checkpoint: ``configs/pretrain-3dmm.yaml``) per frame, optionally refined per frame with a
few Adam steps on the 68-landmark reprojection loss (+ the code regularization of the encoder's
own training loss), then smoothed over time with a One-Euro filter (``modules/one_euro.py``).

Landmarks (``--landmarks``) tell which frames hold a face and are the refinement's targets:
``sidecar`` reads ``<stem>.landmarks.npy`` (``tools/extract_landmarks.py``; beside the video or
under ``--landmarks-dir``), ``detect`` runs a landmark detector (FAN, else dlib), ``auto`` takes
the sidecar when there is one and a detector otherwise (none available: no landmarks), ``none``
uses no landmarks (every frame counts as a face, no refinement).

Sidecar (beside each video, or under ``--output`` keeping the input layout), T = frames::

    shape  T x n_shape   float32   FLAME identity
    exp    T x n_exp     float32   expression
    pose   T x n_pose    float32   axis-angle, global then jaw
    cam    T x 3         float32   weak-perspective camera (s, tx, ty)
    found  T             bool      a face was found in the frame
    info   ()            str       JSON: checkpoint, landmark source, refinement, smoothing, fps

A frame without a face has ``found`` False and repeats the codes of the nearest earlier frame with
a face (of the first one, for leading frames): every row is a usable pose, and ``found`` leaves
those frames out. A video with no face in any frame, or one that cannot be read, fails (logged,
no sidecar); the others still run, and the exit status is non-zero only when every input failed.

Resumable: sidecars are written to a temporary file and renamed once complete; a sidecar that
exists, loads and has one row of codes per frame is skipped (``--overwrite`` redoes it), whoever
wrote it.
"""
import argparse
import copy
import json
import logging
import os
import sys
import zipfile

import numpy as np
import torch
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.video_io import VideoReader  # noqa: E402
from flame.codes import FaceCodes  # noqa: E402
from modules.coords import pixels_to_normalized, resize_map  # noqa: E402
from modules.face_kit import TDMM_LOSS_WEIGHTS, tdmm_loss  # noqa: E402
from modules.one_euro import hold_last_valid, smooth_sequence  # noqa: E402
from tools import video_io  # noqa: E402
from tools.video_io import find_inputs, for_each_video, log_summary, write_atomically  # noqa: E402

log = logging.getLogger("tools.fit_3dmm")
SUFFIX = ".flame.npz"
LANDMARK_SUFFIX = ".landmarks.npy"
CODE_KEYS = ("shape", "exp", "pose", "cam")
SIDECAR_KEYS = CODE_KEYS + ("found",)
LANDMARK_SOURCES = ("auto", "sidecar", "detect", "none")


class NoFaceError(ValueError):
    """No frame of the video holds a face."""


# ----------------------------------------------------------------------------- loading
def landmark_detector(names=("fan", "dlib"), device="cpu"):
    """The first 68-landmark backend of ``names`` that loads (or a ``Skipped`` saying why none
    did)."""
    from modules.backends import first_available
    return first_available("landmarks", list(names), device=device)


def load_tdmm(checkpoint, device="cpu", flame_dir=None):
    """(encoder in eval mode, face model) of a 'tdmm' checkpoint; ``flame_dir`` overrides the
    FLAME folder the checkpoint was trained with (None there: the open head model)."""
    from checkpoint import load_checkpoint
    from config import validate
    from modules.registry import build_model, model_schema
    state = load_checkpoint(checkpoint)
    if state.get("model") != "tdmm":
        raise ValueError(f"--checkpoint {checkpoint} holds a {state.get('model')!r} model; "
                         "fitting needs a 'tdmm' checkpoint (configs/pretrain-3dmm.yaml)")
    params = copy.deepcopy(state.get("model_params") or {})
    params.setdefault("tdmm_params", {})["imagenet_init"] = False   # the weights are here
    if flame_dir is not None:
        params.setdefault("flame_params", {})["model_dir"] = flame_dir
    config = validate({"model": "tdmm", "model_params": params}, model_schema, model_check=False)
    model = build_model(config, dict(state, model_params=params), device)
    return model.encoder, model.flame


# ----------------------------------------------------------------------------- per frame
def refine_codes(face_model, codes, landmarks, steps, lr=3e-2, weights=None, image_size=(256, 256)):
    """Codes after ``steps`` Adam steps on each frame's landmark reprojection loss plus the code
    regularization (``face_kit.tdmm_loss``, landmark distances in pixels of ``image_size``);
    ``landmarks`` B x 68 x 2 normalized, NaN rows are ignored. Frames are independent: the loss
    is summed over them.

    The camera is optimized as log(s) and the image position s * t of the model origin, so one
    learning rate suits every variable: a step of ``lr`` is a relative change of the scale, a
    shift in normalized image units, radians of pose, or units of the code coefficients.
    """
    weights = weights or TDMM_LOSS_WEIGHTS
    scale, trans = codes.cam[:, :1], codes.cam[:, 1:3]
    variables = {name: value.detach().clone() for name, value in codes.fields() if name != "cam"}
    variables.update(log_scale=scale.log().detach(), position=(scale * trans).detach())
    for value in variables.values():
        value.requires_grad_(True)

    def current():
        fields = {k: v for k, v in variables.items() if k not in ("log_scale", "position")}
        s = variables["log_scale"].exp()
        return FaceCodes(**fields, cam=torch.cat([s, variables["position"] / s], dim=1))

    optimizer = torch.optim.Adam(variables.values(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            terms = tdmm_loss(face_model, current(), landmarks, weights, image_size)
            loss = sum(terms.values()) * len(landmarks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return current().detach()


def frames_to_images(frames, size=None):
    """T x H x W x 3 uint8 -> T x 3 x H x W float in [0, 1], resized to ``size`` (H, W)."""
    images = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0
    return resize_map(images, size) if size is not None else images


class Fitter:
    """Codes of batches of frames: encoder, then the optional landmark refinement."""

    def __init__(self, encoder, face_model, device="cpu", size=None, refine_steps=0,
                 refine_lr=3e-2):
        self.encoder, self.face_model, self.device = encoder, face_model, device
        self.size, self.refine_steps, self.refine_lr = size, refine_steps, refine_lr

    def __call__(self, frames, landmarks=None):
        """Codes (dict of numpy B x n arrays) of uint8 frames; ``landmarks`` B x 68 x 2 pixels."""
        images = frames_to_images(frames, self.size).to(self.device)
        with torch.no_grad():
            codes = self.encoder(images).codes
        if self.refine_steps and landmarks is not None:
            height, width = frames[0].shape[:2]
            targets = torch.as_tensor(pixels_to_normalized(landmarks, height, width),
                                      dtype=images.dtype, device=self.device)
            codes = refine_codes(self.face_model, codes, targets, self.refine_steps,
                                 self.refine_lr, image_size=(height, width))
        return codes.to_numpy()


# ----------------------------------------------------------------------------- per video
def sidecar_path(path, input_root, output_root=None):
    return video_io.sidecar_path(path, input_root, output_root, SUFFIX)


def sidecar_complete(path, num_frames):
    """The sidecar at ``path`` exists, loads without pickles and has one row of codes per frame
    (and of ``found`` when it has one: FLAME sidecars from elsewhere, e.g. the synthetic
    dataset's ground truth, count as complete and are never overwritten without --overwrite)."""
    if not os.path.isfile(path):
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = [key for key in SIDECAR_KEYS if key in data.files or key in CODE_KEYS]
            return all(key in data.files and data[key].shape[:1] == (num_frames,) for key in keys)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False


def read_landmark_sidecar(path, num_frames):
    """The 68 iBUG points of a landmark sidecar (T x 68 x 2, or the 74-point layout whose first
    68 are the same points)."""
    points = np.load(path, allow_pickle=False)
    if points.ndim != 3 or points.shape[0] != num_frames or points.shape[1] not in (68, 74) \
            or points.shape[2] != 2:
        raise ValueError(f"landmark sidecar {path} has shape {points.shape}; the video has "
                         f"{num_frames} frames (expected {num_frames} x 68 x 2 or x 74 x 2)")
    return points[:, :68].astype(np.float32)


class LandmarkSource:
    """Per-video landmarks in pixels (T x 68 x 2, NaN rows: no face) from sidecars or a detector,
    following ``--landmarks``; None when the video gets none."""

    def __init__(self, mode="auto", landmarks_dir=None, input_root=None, detector=None):
        if mode not in LANDMARK_SOURCES:
            raise ValueError(f"unknown landmark source {mode!r}; expected one of {LANDMARK_SOURCES}")
        self.mode, self.landmarks_dir, self.input_root = mode, landmarks_dir, input_root
        self.detector = detector

    def sidecar_for(self, path):
        return video_io.sidecar_path(path, self.input_root or path, self.landmarks_dir,
                                     LANDMARK_SUFFIX)

    def from_sidecar(self, path, num_frames):
        """The sidecar's landmarks, None when ``auto`` finds none; an error when required."""
        if self.mode not in ("auto", "sidecar"):
            return None
        sidecar = self.sidecar_for(path)
        if os.path.isfile(sidecar):
            return read_landmark_sidecar(sidecar, num_frames)
        if self.mode == "sidecar":
            raise FileNotFoundError(f"landmark sidecar missing: {sidecar} (tools/extract_landmarks.py "
                                    "writes it; or use --landmarks detect)")
        return None

    def detects(self, from_sidecar):
        return from_sidecar is None and self.mode in ("auto", "detect") and bool(self.detector)


def fit_video(path, fitter, landmark_source, batch_size=16, fps=None, smoothing=None,
              progress=False):
    """Sidecar arrays of one video (see the module docstring); raises on a video without faces."""
    reader = VideoReader(path)
    num_frames = len(reader)
    landmarks = landmark_source.from_sidecar(path, num_frames)
    detect = landmark_source.detects(landmarks)
    rows, detected, batch, start = [], [], [], 0

    def flush():
        points = landmark_source.detector(np.stack(batch)) if detect else (
            landmarks[start:start + len(batch)] if landmarks is not None else None)
        if detect:
            detected.append(points)
        rows.append(fitter(batch, points))

    frames = tqdm(reader, total=num_frames, desc=os.path.basename(path), unit="frame",
                  leave=False, disable=not progress)
    for frame in frames:
        batch.append(frame)
        if len(batch) == batch_size:
            flush()
            start, batch = start + len(batch), []
    if batch:
        flush()
    if sum(len(row["cam"]) for row in rows) != num_frames:
        raise ValueError(f"read {sum(len(row['cam']) for row in rows)} of {num_frames} frames")
    if detect:
        landmarks = np.concatenate(detected)
    codes = {key: np.concatenate([row[key] for row in rows]) for key in CODE_KEYS}
    found = (np.isfinite(landmarks).all(axis=(1, 2)) if landmarks is not None
             else np.ones(num_frames, bool))
    if not found.any():
        raise NoFaceError("no face in any frame")
    frequency = fps or reader.fps or 25.0
    for key in CODE_KEYS:
        codes[key] = (smooth_sequence(codes[key], frequency, valid=found, **smoothing) if smoothing
                      else hold_last_valid(codes[key], found)).astype(np.float32)
    info = {"frames": num_frames, "fps": frequency, "landmarks": (
        "detected" if detect else "sidecar" if landmarks is not None else "none"),
        "smoothing": smoothing or None}
    return dict(codes, found=found), info


def write_sidecar(path, arrays, info):
    write_atomically(path, lambda handle: np.savez(handle, **arrays, info=np.array(json.dumps(info))))


def fit_folder(input_path, fitter, landmark_source, output_root=None, overwrite=False,
               batch_size=16, fps=None, smoothing=None, extra_info=None, progress=True):
    """Sidecars for every video under ``input_path``; returns ``{video: status}`` where status is
    'done', 'skipped' (complete sidecar there) or 'error: ...'."""

    def process(path, target):
        arrays, info = fit_video(path, fitter, landmark_source, batch_size, fps, smoothing,
                                 progress)
        missing = int((~arrays["found"]).sum())
        if missing:
            log.info("%s: no face in %d of %d frames (found = False, codes held)", path, missing,
                     len(arrays["found"]))
        write_sidecar(target, arrays, dict(info, **(extra_info or {})))

    return for_each_video(
        input_path, lambda path: sidecar_path(path, input_path, output_root),
        lambda path, target: not overwrite and sidecar_complete(target, len(VideoReader(path))),
        process, log, progress)


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a 'tdmm' training checkpoint")
    parser.add_argument("--input", required=True, help="a video, a frame folder, or a dataset root")
    parser.add_argument("--output", default=None, help="sidecar folder (default: beside each video)")
    parser.add_argument("--landmarks", default="auto", choices=LANDMARK_SOURCES)
    parser.add_argument("--landmarks-dir", default=None,
                        help="where the landmark sidecars are (default: beside each video)")
    parser.add_argument("--detector", default="auto", choices=["auto", "fan", "dlib"])
    parser.add_argument("--refine-steps", type=int, default=0,
                        help="Adam steps per frame on the landmark loss (0: no refinement)")
    parser.add_argument("--refine-lr", type=float, default=3e-2,
                        help="Adam learning rate of the refinement")
    parser.add_argument("--no-smooth", action="store_true", help="keep the per-frame codes")
    parser.add_argument("--min-cutoff", type=float, default=1.0, help="One-Euro cut-off at rest (Hz)")
    parser.add_argument("--beta", type=float, default=0.5, help="One-Euro speed coefficient")
    parser.add_argument("--d-cutoff", type=float, default=1.0, help="One-Euro speed cut-off (Hz)")
    parser.add_argument("--fps", type=float, default=None,
                        help="frame rate for smoothing (default: the video's, else 25)")
    parser.add_argument("--size", type=int, default=None, help="resize frames to size x size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--flame-dir", default=None,
                        help="FLAME folder (default: the checkpoint's; the open head when none)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def make_landmark_source(args):
    detector = None
    if args.landmarks in ("auto", "detect"):
        names = ("fan", "dlib") if args.detector == "auto" else (args.detector,)
        detector = landmark_detector(names, args.device)
        if not detector:
            if args.landmarks == "detect":
                raise RuntimeError(f"no landmark detector available: {detector.reason}")
            log.info("no landmark detector (%s): videos without a landmark sidecar get no "
                     "landmarks (every frame counts as a face)", detector.reason)
    return LandmarkSource(args.landmarks, args.landmarks_dir, args.input, detector)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.refine_steps and args.landmarks == "none":
        log.error("--refine-steps needs landmarks: use --landmarks auto, sidecar or detect")
        return 2
    if not os.path.exists(args.input) or not find_inputs(args.input):
        log.error("no videos or frame folders found at %s", args.input)
        return 2
    try:
        encoder, face_model = load_tdmm(args.checkpoint, args.device, args.flame_dir)
        landmark_source = make_landmark_source(args)
    except (OSError, ValueError, RuntimeError) as error:
        log.error("%s", error)
        return 2
    size = (args.size, args.size) if args.size else None
    fitter = Fitter(encoder, face_model, args.device, size, args.refine_steps, args.refine_lr)
    smoothing = None if args.no_smooth else {"min_cutoff": args.min_cutoff, "beta": args.beta,
                                             "d_cutoff": args.d_cutoff}
    extra = {"checkpoint": os.path.abspath(args.checkpoint), "refine_steps": args.refine_steps,
             "refine_lr": args.refine_lr, "size": args.size}
    summary = fit_folder(args.input, fitter, landmark_source, args.output, args.overwrite,
                         args.batch_size, args.fps, smoothing, extra, progress=not args.no_progress)
    return 1 if log_summary(log, summary) == len(summary) else 0


if __name__ == "__main__":
    sys.exit(main())
