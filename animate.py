"""Animate a source portrait with a driving video; a Python API and the ``--mode animate`` entry.

    from animate import animate
    animate(model, "face.png", "driving.mp4", "out.mp4", relative=True)

Relative motion (FOMM; SAFA appendix B) transfers the motion between a reference driving frame and
each driving frame onto the source. The reference is frame 0, ``best_frame``, or, with
``find_best_frame``, the driving frame whose pose is closest to the source's (normalized face
landmarks when a landmark detector is available, otherwise the model's own pose descriptor).

Streaming: since every output frame depends only on the source, the reference frame and its own
driving frame, one pass finds the reference (keeping only small descriptors) and a second pass
generates frames in order, reading and writing one batch at a time. This equals FOMM's
"forward and backward from the best frame" without holding the video in memory. The output has the
driving video's frame count and fps, and its audio track when it has one.

Real photos and videos (docs/crop_and_paste.md): with ``crop='auto'`` an input whose size is not
the model's frame size is cropped around its face as the training data was (the source: largest
face or ``face_index``; the driving video: a smoothed crop track), so relative motion, the
reference search and ``adapt_scale`` see face crops, and a face that moves across the driving
frame drives the source in place. ``paste_back=True`` resizes each animated crop back and blends it
into the source photo (feathered), so the video has the photo's resolution and background;
``result_size`` sets the size of the crop-only video instead.
"""
import os

import numpy as np
import torch
from tqdm import tqdm

from datasets.cropped_video import FaceCropper
from datasets.frames_dataset import image_to_tensor
from datasets.video_io import (VideoReader, VideoWriter, check_output_path, copy_audio,
                               resize_frame, temporary_path, video_stem)
from logger import to_uint8_image
from modules.coords import pixels_to_normalized
from modules.one_euro import hold_last_valid
from reconstruction import batched


def model_frame_size(model, config=None):
    shape = (config or model.config)["dataset_params"]["frame_shape"]
    return tuple(shape[:2])


def normalized_landmarks(points):
    """68 x 2 landmarks centred on their mean and scaled by the square root of their convex hull's
    area, so the distance compares expression and pose, not face position or size (FOMM)."""
    from scipy.spatial import ConvexHull
    centred = points - points.mean(axis=0)
    return centred / np.sqrt(ConvexHull(points).volume)  # a 2D hull's volume is its area


def landmark_detector(choice):
    """The detector for ``best_frame_by``: 'landmarks' needs one, 'auto' uses one if it loads."""
    if choice == "model":
        return None
    from modules.backends import Backend, first_available
    detector = first_available("landmarks", ["fan", "dlib"])
    if isinstance(detector, Backend):
        return detector
    if choice == "landmarks":
        raise FileNotFoundError(f"animate_params.best_frame_by is 'landmarks' but no landmark "
                                f"detector loads: {detector.reason}")
    return None


@torch.no_grad()
def find_reference_frame(model, source_state, source_array, reader, device, batch_size=8,
                         detector=None):
    """Index of the driving frame closest to the source: by normalized face landmarks when a
    detector finds the source's face, else by the model's pose descriptor (FOMM: keypoints,
    SAFA: head pose)."""
    target = None
    if detector is not None:
        found = detector(source_array[None])[0]
        target = normalized_landmarks(found) if np.isfinite(found).all() else None
    if target is None:
        target = model.pose_descriptor(source_state)
    best, best_distance = 0, float("inf")
    for start, chunk in _indexed_batches(reader, batch_size):
        if isinstance(target, np.ndarray):
            distances = [float(((normalized_landmarks(p) - target) ** 2).sum())
                         if np.isfinite(p).all() else float("inf")
                         for p in detector(np.stack(chunk))]
        else:
            driving = torch.stack([image_to_tensor(f) for f in chunk]).to(device)
            descriptor = model.pose_descriptor(model.encode_driving(driving))
            distances = ((descriptor - target) ** 2).sum(dim=1).tolist()
        position = int(np.argmin(distances))
        if distances[position] < best_distance:
            best, best_distance = start + position, distances[position]
    return best


def _indexed_batches(reader, batch_size):
    start = 0
    for chunk in batched(iter(reader), batch_size):
        yield start, chunk
        start += len(chunk)


def frames_to_batch(frames, device):
    """A list of H x W x 3 uint8 frames -> B x 3 x H x W float in [0, 1] on ``device``."""
    return torch.stack([image_to_tensor(f) for f in frames]).to(device)


class DrivingVideo:
    """What drives an animation, here the frames of a video (models whose ``driving_signal`` is
    'frames'). A driving source has a length, an fps, optionally an audio source, and yields the
    model's driving states batch by batch; other sources (landmark files, edit sequences) give
    the same four things."""

    def __init__(self, path, frame_size, default_fps=25.0):
        self.path = path
        self.reader = VideoReader(path, frame_size)
        self.fps = self.reader.fps or default_fps   # frame folders and stacked images have none
        self.audio_source = path

    def __len__(self):
        return len(self.reader)

    def states(self, model, batch_size, device):
        smoother = model.driving_smoother(self.fps)   # one per pass over the video, if any
        for chunk in batched(iter(self.reader), batch_size):
            state = model.encode_driving(frames_to_batch(chunk, device))
            yield smoother(state) if smoother else state

    def reference_state(self, model, index, device):
        return model.encode_driving(frames_to_batch([self.reader[index]], device))

    def find_reference(self, model, source_state, source_array, batch_size, device, detector):
        return find_reference_frame(model, source_state, source_array, self.reader, device,
                                    batch_size, detector)

    def close(self):
        self.reader.close()


class FaceCroppedVideo(DrivingVideo):
    """A driving video of real footage: every frame cut by the video's smoothed face crop track
    (:meth:`datasets.cropped_video.FaceCropper.video`; frames already of the model's size are
    used as they are), so the reference search, ``adapt_scale`` and every driving state see the
    face as the model was trained on it."""

    def __init__(self, path, cropper, default_fps=25.0):
        self.path = path
        self.reader = cropper.video(path)
        self.fps = self.reader.fps or default_fps
        self.audio_source = path
        self.crop_note = getattr(self.reader, "note", "")


def driving_from_path(path, size, cropper, default_fps=25.0):
    """The driving source of a video path: face-cropped unless ``cropper.mode`` is 'none'."""
    if cropper.mode == "none":
        return DrivingVideo(path, size, default_fps)
    return FaceCroppedVideo(path, cropper, default_fps)


class EditSequence:
    """Driving by edits of the source itself (no driving video): each element is the source with
    one :class:`modules.editing.FaceEdit` applied, rendered through ``model.edit`` (models with
    an explicit head pose and expression). Always absolute: the edits say where the head goes."""

    audio_source = None

    def __init__(self, edits, fps=25.0):
        if not edits:
            raise ValueError("an edit sequence needs at least one edit")
        self.edits, self.fps = list(edits), fps
        self.source_state = None    # set by animate() before states() is asked for

    def __len__(self):
        return len(self.edits)

    def states(self, model, batch_size, device):
        for start in range(0, len(self.edits), batch_size):
            yield model.edit(self.source_state, self.edits[start:start + batch_size])

    def reference_state(self, model, index, device):
        raise ValueError("an edit sequence animates absolutely (the edits place the head); "
                         "use --absolute")

    def close(self):
        pass


def edit_sequence_from_args(edit=None, sweep=None, fps=25.0):
    """The ``--edit`` / ``--edit_sweep`` command-line forms as an :class:`EditSequence`:
    ``--edit "yaw=0,pitch=0"`` (one frame: frontalize) and ``--edit_sweep "yaw:-30:30:61"``
    (name:start:stop:steps, on top of ``--edit`` when both are given)."""
    from modules.editing import FaceEdit, parse_edit, sweep_edits
    base = parse_edit(edit) if edit else FaceEdit()
    if not sweep:
        return EditSequence([base], fps)
    try:
        name, start, stop, steps = sweep.split(":")
        edits = sweep_edits(name, float(start), float(stop), int(steps), base)
    except ValueError as error:
        raise ValueError(f"--edit_sweep {sweep!r}: {error} (expected name:start:stop:steps, "
                         "e.g. yaw:-30:30:61)") from None
    return EditSequence(edits, fps)


class DrivingLandmarks:
    """Driving by a landmark file, no driving frames at all (models whose ``driving_signal`` is
    'landmarks', e.g. ``s2d``).

    The file holds ``T x N x 2`` pixel coordinates (x, y; N = 74 or 68,
    ``modules/landmark_layout.py``) of frames ``frame_size = (H, W)`` pixels large: a ``.npy``
    array (then ``frame_size`` must be given) or an ``.npz`` with the array under ``landmarks``
    and optionally ``frame_size`` (H, W) and ``fps``. Arguments given here win over the file's.
    Rows with NaN (no face) repeat the last valid row before them. The output video has one
    frame per row, at ``fps`` (else the file's, else ``default_fps``).
    """

    audio_source = None

    def __init__(self, path, frame_size=None, fps=None, default_fps=25.0):
        points, file_size, file_fps = read_landmark_file(path)
        size = frame_size or file_size
        if size is None:
            raise ValueError(f"{path}: the frame size its pixel coordinates refer to is unknown: "
                             f"pass --landmarks_size H,W or save an .npz with 'frame_size'")
        self.path, self.frame_size = path, tuple(int(v) for v in size)
        self.fps = float(fps or file_fps or default_fps)
        valid = np.isfinite(points).all(axis=(1, 2))
        if not valid.any():
            raise ValueError(f"{path}: every row is NaN (no face in any frame)")
        self.missing = int((~valid).sum())
        points = hold_last_valid(points, valid)
        self.landmarks = torch.from_numpy(
            pixels_to_normalized(points, *self.frame_size).astype(np.float32))

    def __len__(self):
        return len(self.landmarks)

    def states(self, model, batch_size, device):
        for start in range(0, len(self.landmarks), batch_size):
            yield model.encode_driving(self.landmarks[start:start + batch_size].to(device))

    def reference_state(self, model, index, device):
        return model.encode_driving(self.landmarks[index:index + 1].to(device))

    def find_reference(self, model, source_state, source_array, batch_size, device, detector):
        """The row whose landmarks are closest to the source's (the model's pose descriptor:
        centred, size-normalized landmarks)."""
        target = model.pose_descriptor(source_state)
        distances = torch.cat([((model.pose_descriptor(state) - target) ** 2).sum(dim=1).cpu()
                               for state in self.states(model, batch_size, device)])
        return int(distances.argmin())

    def close(self):
        pass


def read_landmark_file(path):
    """``(points T x N x 2 float32 pixels, frame_size (H, W) or None, fps or None)`` of a
    ``.npy`` or ``.npz`` landmark file (arrays only: nothing in it can run code)."""
    from modules.landmark_layout import check_layout
    if not os.path.isfile(path):
        raise FileNotFoundError(f"driving landmark file not found: {path}")
    frame_size = fps = None
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            if "landmarks" not in data:
                raise ValueError(f"{path}: an .npz landmark file holds its T x N x 2 array under "
                                 f"'landmarks' (found {sorted(data.files)})")
            points = np.asarray(data["landmarks"], dtype=np.float32)
            if "frame_size" in data:
                frame_size = tuple(int(v) for v in np.asarray(data["frame_size"]).ravel()[:2])
            if "fps" in data:
                fps = float(data["fps"])
    elif path.endswith(".npy"):
        points = np.load(path, allow_pickle=False).astype(np.float32)
    else:
        raise ValueError(f"{path}: driving landmarks are a .npy array or an .npz file")
    if points.ndim != 3 or points.shape[-1] != 2 or not len(points):
        raise ValueError(f"{path}: expected T x N x 2 pixel landmarks, got shape {points.shape}")
    check_layout(points.shape[1])
    return points, frame_size, fps


def parse_frame_size(text):
    """``'256'`` -> (256, 256); ``'256,320'`` (H,W) -> (256, 320); None -> None."""
    if text is None:
        return None
    try:
        values = [int(v) for v in str(text).replace("x", ",").split(",") if v.strip()]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 2:
        raise ValueError(f"--landmarks_size {text!r}: expected H,W or one side, e.g. 256,256")
    return (values[0], values[-1])


class PartialMotionVideo:
    """A driving video that transfers only part of its motion: ``'pose'`` (the head rotation,
    translation and scale, the source keeps its expression) or ``'expression'`` (the source keeps
    its head pose); ``'all'`` is a plain driving video. For models whose motion is an explicit
    head pose plus an expression (``transfer_modes``: facevid2vid, mmfa); relative and absolute
    animation both work (the states carry the choice to the model).

    Wraps the video's driving source, which :class:`Animation` opens like any driving path (so
    face cropping applies); ``frame_size`` opens it at once without cropping."""

    def __init__(self, path, frame_size=None, transfer="pose", default_fps=25.0):
        self.path, self.transfer, self.video = os.fspath(path), transfer, None
        if frame_size is not None:
            self.open(DrivingVideo(self.path, frame_size, default_fps))

    def open(self, video):
        self.video = video
        self.fps, self.audio_source = video.fps, video.audio_source

    def __len__(self):
        return len(self.video)

    def find_reference(self, *args, **kwargs):
        return self.video.find_reference(*args, **kwargs)

    def close(self):
        if self.video is not None:
            self.video.close()

    def check(self, model):
        modes = getattr(model, "transfer_modes", ("all",))
        if self.transfer not in modes:
            raise ValueError(f"--transfer {self.transfer}: model {model.name!r} supports "
                             f"{', '.join(modes)} (partial transfer needs an explicit head pose "
                             "and expression, as facevid2vid and mmfa have)")

    def states(self, model, batch_size, device):
        self.check(model)
        for state in self.video.states(model, batch_size, device):
            yield dict(state, transfer=self.transfer)

    def reference_state(self, model, index, device):
        self.check(model)
        return dict(self.video.reference_state(model, index, device), transfer=self.transfer)


class ExpressionInterpolation(EditSequence):
    """The source keeps its head pose while its expression moves from image A's to image B's
    through MMFA's expression VAE (seed 004, section 4.4): ``steps`` frames, t = 0 .. 1.

    ``vae_model``: a trained ``mmfa_vae`` model (:func:`load_expression_vae`) that learned the
    animating MMFA model's expression features (checked). At t = 0 and t = 1 the expression is
    exactly image A's and image B's (``modules/expression_vae.py``)."""

    def __init__(self, vae_model, image_a, image_b, steps, fps=25.0):
        if steps < 2:
            raise ValueError(f"an expression interpolation needs at least 2 steps, got {steps}")
        self.vae_model, self.images = vae_model, (image_a, image_b)
        self.weights = np.linspace(0.0, 1.0, steps)
        self.edits, self.fps = list(self.weights), fps
        self.source_state = None    # set by animate() before states() is asked for
        self.cropper = None         # the source's face cropper, also set by animate()

    def states(self, model, batch_size, device):
        if not hasattr(model, "expression_states"):
            raise ValueError(f"expression interpolation drives MMFA models; {model.name!r} has no "
                             "expression features")
        self.vae_model.to(device).eval()
        self.vae_model.check_encoder(model.expression_encoder)
        size = model_frame_size(model)
        cropper = self.cropper or FaceCropper("none", size)
        image_a, image_b = (image_to_tensor(cropper.picture(image, f"expression image {name}")
                                            .frame)[None].to(device)
                            for name, image in zip("AB", self.images))
        features = self.vae_model.interpolate(image_a, image_b, self.weights)
        for start in range(0, len(self.weights), batch_size):
            yield model.expression_states(self.source_state, features[start:start + batch_size])


def load_expression_vae(path, device="cpu"):
    """A trained ``mmfa_vae`` model from its checkpoint (eval mode)."""
    from checkpoint import load_checkpoint
    from config import validate
    from modules.registry import build_model, model_schema
    state = load_checkpoint(path)
    if state.get("model") != "mmfa_vae":
        raise ValueError(f"--vae_checkpoint {path} holds a {state.get('model')!r} model; expected "
                         "an 'mmfa_vae' checkpoint (python run.py --config tiny-mmfa-vae.yaml "
                         "--mode train)")
    config = validate({"model": "mmfa_vae", "model_params": state["model_params"]}, model_schema,
                      model_check=False)
    return build_model(config, state, device)


def driving_from_args(args, config, device="cpu"):
    """What drives ``--mode animate`` from the command line: an edit sequence (``--edit`` /
    ``--edit_sweep``), an expression interpolation (``--interpolate_expression``), a landmark
    file (``--driving_landmarks``), or the driving video, whole or in part (``--transfer``)."""
    params = config["animate_params"]
    if getattr(args, "interpolate_expression", None):
        if not getattr(args, "vae_checkpoint", None):
            raise ValueError("--interpolate_expression needs --vae_checkpoint (a trained mmfa_vae "
                             "checkpoint)")
        try:
            image_a, image_b = args.interpolate_expression.split(",")
        except ValueError:
            raise ValueError(f"--interpolate_expression {args.interpolate_expression!r}: expected "
                             "two image paths separated by a comma") from None
        return ExpressionInterpolation(load_expression_vae(args.vae_checkpoint, device), image_a,
                                       image_b, args.interpolation_steps, params["fps"])
    if args.edit or args.edit_sweep:
        return edit_sequence_from_args(args.edit, args.edit_sweep, params["fps"])
    if getattr(args, "driving_landmarks", None):
        return DrivingLandmarks(args.driving_landmarks, parse_frame_size(args.landmarks_size),
                                args.landmarks_fps, params["fps"])
    return video_driving(args.driving_video, getattr(args, "transfer", "all"), params["fps"])


def video_driving(path, transfer="all", default_fps=25.0):
    """A driving video as :func:`animate` takes it: the path itself for a whole transfer (animate
    opens it, face-cropped unless ``crop='none'``), a :class:`PartialMotionVideo` otherwise."""
    return path if transfer == "all" else PartialMotionVideo(path, None, transfer, default_fps)


def choose_reference(driving, model, source_state, source_array, relative, best_frame,
                     find_best_frame, best_frame_by, batch_size, device):
    """Index of the driving element relative motion is measured from (0 by default)."""
    if best_frame is not None:
        if not 0 <= best_frame < len(driving):
            raise ValueError(f"--best_frame {best_frame} is outside the driving sequence "
                             f"(0..{len(driving) - 1})")
        return best_frame
    if find_best_frame and relative and hasattr(driving, "find_reference"):
        return driving.find_reference(model, source_state, source_array, batch_size, device,
                                      landmark_detector(best_frame_by))
    return 0


class Animation:
    """One source picture animated by one driving sequence: ``frames()`` yields the output frames
    (H x W x 3 uint8) in order, one batch of driving frames at a time. Use it as a context manager
    (or call ``close()``). :func:`animate` writes them to a video; the arguments are its own.

    Attributes: ``source`` (a :class:`datasets.cropped_video.CroppedPicture`: the photo, the
    model's input and the crop), ``driving`` (the driving source), ``reference_index``, ``fps``.
    """

    @torch.no_grad()
    def __init__(self, model, source_image, driving, relative=True, adapt_scale=False,
                 best_frame=None, find_best_frame=False, device=None, batch_size=8,
                 default_fps=25.0, best_frame_by="auto", crop="auto", face_index=None,
                 paste_back=False, result_size=None):
        if paste_back and result_size:
            raise ValueError("result_size sets the size of the crop-only video; with paste_back "
                             "the output has the source photo's size (drop one of them)")
        if result_size is not None and int(result_size) < 1:
            raise ValueError(f"result_size must be a positive number of pixels, got {result_size}")
        self.model, self.device = model, device or next(model.parameters()).device
        self.batch_size, self.adapt_scale = batch_size, adapt_scale
        self.paste_back, self.result_size = paste_back, result_size
        model.eval()
        size = model_frame_size(model)
        cropper = FaceCropper(crop, size, face_index, default_fps=default_fps)
        self.source = cropper.picture(source_image)
        self.source_state = model.encode_source(
            image_to_tensor(self.source.frame)[None].to(self.device))
        if isinstance(driving, (str, os.PathLike)):
            driving = driving_from_path(os.fspath(driving), size, cropper, default_fps)
        elif isinstance(driving, PartialMotionVideo) and driving.video is None:
            driving.open(driving_from_path(driving.path, size, cropper, default_fps))
        self.driving, self.relative = driving, relative
        if isinstance(driving, EditSequence):
            driving.source_state, self.relative = self.source_state, False
            driving.cropper = cropper
        try:
            self.reference_index = choose_reference(
                driving, model, self.source_state, self.source.frame, self.relative, best_frame,
                find_best_frame, best_frame_by, batch_size, self.device)
            self.reference_state = driving.reference_state(model, self.reference_index,
                                                           self.device) if self.relative else None
        except BaseException:
            driving.close()
            raise

    def __len__(self):
        return len(self.driving)

    @property
    def fps(self):
        return self.driving.fps

    def output_frame(self, image):
        """A generated image (3 x S x S in [0, 1]) as an output frame: pasted into the photo,
        resized to ``result_size``, or as it is."""
        frame = to_uint8_image(image)
        if self.paste_back:
            return self.source.paste(frame)
        if self.result_size:
            return resize_frame(frame, (int(self.result_size),) * 2)
        return frame

    @torch.no_grad()
    def frames(self, progress=False):
        bar = tqdm(total=len(self.driving), desc="animate", disable=not progress)
        for driving_state in self.driving.states(self.model, self.batch_size, self.device):
            out = self.model.generate(self.source_state, driving_state, self.reference_state,
                                      relative=self.relative, adapt_scale=self.adapt_scale)
            for image in out["prediction"]:
                yield self.output_frame(image)
            bar.update(out["prediction"].shape[0])
        bar.close()

    def crop_notes(self):
        """What was cropped: the source's and the driving video's notes."""
        notes = {"source": self.source.note}
        if getattr(self.driving, "crop_note", ""):
            notes["driving"] = self.driving.crop_note
        return notes

    def close(self):
        self.driving.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def animate(model, source_image, driving, output_path, relative=True, adapt_scale=False,
            best_frame=None, find_best_frame=False, device=None, batch_size=8, default_fps=25.0,
            progress=True, best_frame_by="auto", crop="auto", face_index=None, paste_back=False,
            result_size=None):
    """Write ``output_path``; returns a dict with frame count, fps, reference frame, audio flag,
    output size (width, height) and the crop notes.

    ``source_image``: a path or an H x W x C uint8 array. ``driving``: a video path or a driving
    source object (see :class:`DrivingVideo`). ``best_frame_by``: how ``find_best_frame``
    compares frames: 'landmarks' (a face landmark detector), 'model' (the model's pose
    descriptor) or 'auto' (landmarks when a detector loads). ``crop``: 'auto' (inputs not of the
    model's frame size are cropped around the face), 'face' (always) or 'none' (resized whole);
    ``face_index``: which face of the source (numbered from the left; default the largest).
    ``paste_back``: blend each animated crop back into the source photo (output of the photo's
    size); ``result_size``: side of the crop-only output (default: the model's frame size).
    """
    check_output_path(output_path, [source_image, getattr(driving, "path", driving)])
    silent_path = temporary_path(output_path)  # video without audio, before muxing
    written, size = 0, None
    try:
        with Animation(model, source_image, driving, relative, adapt_scale, best_frame,
                       find_best_frame, device, batch_size, default_fps, best_frame_by, crop,
                       face_index, paste_back, result_size) as animation:
            with VideoWriter(silent_path, animation.fps) as writer:
                for frame in animation.frames(progress):
                    writer.write(frame)
                    written, size = written + 1, frame.shape[1::-1]
            audio = copy_audio(silent_path, animation.driving.audio_source, output_path)
    finally:
        if os.path.exists(silent_path):
            os.remove(silent_path)
    return {"frames": written, "fps": animation.fps, "reference_frame": animation.reference_index,
            "audio": audio, "path": output_path, "size": tuple(int(v) for v in size),
            "crop": animation.crop_notes()}


def crop_options(args):
    """``animate``'s crop and output arguments from the command line's flags."""
    return {"crop": args.crop, "face_index": args.face_index, "paste_back": args.paste_back,
            "result_size": args.result_size}


def run_animate(args, config, run_dir, device):
    """``--mode animate``: one source/driving pair from the command line, or the dataset's pairs."""
    from datasets.frames_dataset import PairedDataset, build_dataset
    params = config["animate_params"]
    relative = params["relative"] and not args.absolute
    adapt = params["adapt_movement_scale"] or args.adapt_scale
    find_best = params["find_best_frame"] or args.find_best_frame
    if args.result_video:  # before the model loads: a wrong path fails at once
        check_output_path(args.result_video, [args.source_image, args.driving_video])
    from modules.precision import SpeedSettings, prepare_inference
    from modules.registry import build_model
    model = prepare_inference(build_model(config, args.checkpoint, device),
                              SpeedSettings.for_inference(config, "animate_params"), device)
    out_dir = os.path.join(run_dir, "animation")
    drivers = [bool(args.driving_video),
               bool(args.edit or args.edit_sweep or getattr(args, "interpolate_expression", None)),
               bool(getattr(args, "driving_landmarks", None))]
    if args.source_image or any(drivers):
        if not args.source_image or sum(drivers) != 1:
            raise ValueError("animate needs --source_image and one of --driving_video, "
                             "--driving_landmarks, --edit/--edit_sweep or --interpolate_expression "
                             "(or none of them, to animate the test set's pairs)")
        result = args.result_video or os.path.join(out_dir, "result.mp4")
        driving = driving_from_args(args, config, device)
        info = animate(model, args.source_image, driving, result, relative, adapt,
                       args.best_frame, find_best, device, params["batch_size"], params["fps"],
                       best_frame_by=params["best_frame_by"], **crop_options(args))
        for what, note in info["crop"].items():
            print(f"crop ({what}): {note}")
        width, height = info["size"]
        print(f"animate: {info['frames']} frames of {width}x{height} at {info['fps']:.2f} fps "
              f"(reference frame {info['reference_frame']}, audio "
              f"{'kept' if info['audio'] else 'none'}) -> {result}")
        return [info]
    dataset = build_dataset(config, is_train=False)
    pairs = PairedDataset(dataset, params["num_pairs"], seed=args.seed,
                          pairs_list=config["dataset_params"]["pairs_list"])
    results = []
    for i in tqdm(range(len(pairs)), desc="pairs"):
        pair = pairs[i]
        source_reader = VideoReader(pair["source_video"])   # as stored: crop decides below
        source_frame = source_reader[0]
        source_reader.close()
        name = f"{video_stem(pair['source_video'])}-{video_stem(pair['driving_video'])}"
        driving = video_driving(pair["driving_video"], getattr(args, "transfer", "all"),
                                params["fps"])
        results.append(animate(model, source_frame, driving,
                               os.path.join(out_dir, name + params["format"]), relative, adapt,
                               args.best_frame, find_best, device, params["batch_size"],
                               default_fps=params["fps"], progress=False,
                               best_frame_by=params["best_frame_by"], **crop_options(args)))
    print(f"animate: {len(results)} pairs -> {out_dir}")
    return results
