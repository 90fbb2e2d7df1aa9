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
"""
import os

import numpy as np
import torch
from tqdm import tqdm

from datasets.frames_dataset import image_to_tensor
from datasets.video_io import (VideoReader, VideoWriter, copy_audio, read_image, temporary_path,
                               video_stem)
from logger import to_uint8_image
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
        for chunk in batched(iter(self.reader), batch_size):
            yield model.encode_driving(frames_to_batch(chunk, device))

    def reference_state(self, model, index, device):
        return model.encode_driving(frames_to_batch([self.reader[index]], device))

    def find_reference(self, model, source_state, source_array, batch_size, device, detector):
        return find_reference_frame(model, source_state, source_array, self.reader, device,
                                    batch_size, detector)

    def close(self):
        self.reader.close()


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


class PartialMotionVideo(DrivingVideo):
    """A driving video that transfers only part of its motion: ``'pose'`` (the head rotation,
    translation and scale, the source keeps its expression) or ``'expression'`` (the source keeps
    its head pose); ``'all'`` is a plain :class:`DrivingVideo`. For models whose motion is an
    explicit head pose plus an expression (``transfer_modes``: facevid2vid, mmfa); relative and
    absolute animation both work (the states carry the choice to the model)."""

    def __init__(self, path, frame_size, transfer, default_fps=25.0):
        super().__init__(path, frame_size, default_fps)
        self.transfer = transfer

    def check(self, model):
        modes = getattr(model, "transfer_modes", ("all",))
        if self.transfer not in modes:
            raise ValueError(f"--transfer {self.transfer}: model {model.name!r} supports "
                             f"{', '.join(modes)} (partial transfer needs an explicit head pose "
                             "and expression, as facevid2vid and mmfa have)")

    def states(self, model, batch_size, device):
        self.check(model)
        for state in super().states(model, batch_size, device):
            yield dict(state, transfer=self.transfer)

    def reference_state(self, model, index, device):
        self.check(model)
        return dict(super().reference_state(model, index, device), transfer=self.transfer)


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

    def states(self, model, batch_size, device):
        if not hasattr(model, "expression_states"):
            raise ValueError(f"expression interpolation drives MMFA models; {model.name!r} has no "
                             "expression features")
        self.vae_model.to(device).eval()
        self.vae_model.check_encoder(model.expression_encoder)
        size = model_frame_size(model)
        image_a, image_b = (image_to_tensor(load_source(image, size))[None].to(device)
                            for image in self.images)
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


def driving_from_args(args, model, config, device="cpu"):
    """What drives ``--mode animate`` from the command line: an edit sequence (``--edit`` /
    ``--edit_sweep``), an expression interpolation (``--interpolate_expression``), or the driving
    video, whole or in part (``--transfer``)."""
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
    return video_driving(args.driving_video, model_frame_size(model, config),
                         getattr(args, "transfer", "all"), params["fps"])


def video_driving(path, frame_size, transfer="all", default_fps=25.0):
    """A driving video path as ``animate`` takes it: the path itself for a whole transfer, a
    :class:`PartialMotionVideo` for ``'pose'`` / ``'expression'``."""
    if transfer == "all":
        return path
    return PartialMotionVideo(path, frame_size, transfer, default_fps)


def load_source(source_image, size):
    """A path or an H x W x C uint8 array (any size; gray/RGBA converted) -> H x W x 3 uint8."""
    if isinstance(source_image, str):
        return read_image(source_image, size)
    from datasets.video_io import to_rgb_uint8
    return to_rgb_uint8(source_image, "source image", size)


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


@torch.no_grad()
def animate(model, source_image, driving, output_path, relative=True, adapt_scale=False,
            best_frame=None, find_best_frame=False, device=None, batch_size=8, default_fps=25.0,
            progress=True, best_frame_by="auto"):
    """Write ``output_path``; returns a dict with frame count, fps, reference frame and audio flag.

    ``source_image``: a path or an H x W x C uint8 array. ``driving``: a video path or a driving
    source object (see :class:`DrivingVideo`). ``best_frame_by``: how ``find_best_frame``
    compares frames: 'landmarks' (a face landmark detector), 'model' (the model's pose
    descriptor) or 'auto' (landmarks when a detector loads).
    """
    device = device or next(model.parameters()).device
    model.eval()
    size = model_frame_size(model)
    source_array = load_source(source_image, size)
    source_state = model.encode_source(image_to_tensor(source_array)[None].to(device))
    if isinstance(driving, (str, os.PathLike)):
        driving = DrivingVideo(os.fspath(driving), size, default_fps)
    if isinstance(driving, EditSequence):
        driving.source_state, relative = source_state, False
    silent_path = temporary_path(output_path)  # video without audio, before muxing
    written = 0
    try:
        reference_index = choose_reference(driving, model, source_state, source_array, relative,
                                           best_frame, find_best_frame, best_frame_by,
                                           batch_size, device)
        reference_state = driving.reference_state(model, reference_index, device) \
            if relative else None
        with VideoWriter(silent_path, driving.fps) as writer:
            bar = tqdm(total=len(driving), desc="animate", disable=not progress)
            for driving_state in driving.states(model, batch_size, device):
                out = model.generate(source_state, driving_state, reference_state,
                                     relative=relative, adapt_scale=adapt_scale)
                for image in out["prediction"]:
                    writer.write(to_uint8_image(image))
                written += out["prediction"].shape[0]
                bar.update(out["prediction"].shape[0])
            bar.close()
        audio = copy_audio(silent_path, driving.audio_source, output_path)
    finally:
        driving.close()
        if os.path.exists(silent_path):
            os.remove(silent_path)
    return {"frames": written, "fps": driving.fps, "reference_frame": reference_index,
            "audio": audio, "path": output_path}


def run_animate(args, config, run_dir, device):
    """``--mode animate``: one source/driving pair from the command line, or the dataset's pairs."""
    from datasets.frames_dataset import PairedDataset, build_dataset
    params = config["animate_params"]
    relative = params["relative"] and not args.absolute
    adapt = params["adapt_movement_scale"] or args.adapt_scale
    find_best = params["find_best_frame"] or args.find_best_frame
    from modules.registry import build_model
    model = build_model(config, args.checkpoint, device)
    out_dir = os.path.join(run_dir, "animation")
    editing = args.edit or args.edit_sweep or getattr(args, "interpolate_expression", None)
    if args.source_image or args.driving_video or editing:
        if not args.source_image or bool(args.driving_video) == bool(editing):
            raise ValueError("animate needs --source_image and either --driving_video or "
                             "--edit/--edit_sweep/--interpolate_expression (or none of them, to "
                             "animate the test set's pairs)")
        result = args.result_video or os.path.join(out_dir, "result.mp4")
        driving = driving_from_args(args, model, config, device)
        info = animate(model, args.source_image, driving, result, relative, adapt,
                       args.best_frame, find_best, device, params["batch_size"], params["fps"],
                       best_frame_by=params["best_frame_by"])
        print(f"animate: {info['frames']} frames at {info['fps']:.2f} fps (reference frame "
              f"{info['reference_frame']}, audio {'kept' if info['audio'] else 'none'}) -> {result}")
        return [info]
    dataset = build_dataset(config, is_train=False)
    pairs = PairedDataset(dataset, params["num_pairs"], seed=args.seed,
                          pairs_list=config["dataset_params"]["pairs_list"])
    results = []
    for i in tqdm(range(len(pairs)), desc="pairs"):
        pair = pairs[i]
        source_reader = VideoReader(pair["source_video"], model_frame_size(model, config))
        source_frame = source_reader[0]
        source_reader.close()
        name = f"{video_stem(pair['source_video'])}-{video_stem(pair['driving_video'])}"
        driving = video_driving(pair["driving_video"], model_frame_size(model, config),
                                getattr(args, "transfer", "all"), params["fps"])
        results.append(animate(model, source_frame, driving,
                               os.path.join(out_dir, name + params["format"]), relative, adapt,
                               args.best_frame, find_best, device, params["batch_size"],
                               default_fps=params["fps"], progress=False,
                               best_frame_by=params["best_frame_by"]))
    print(f"animate: {len(results)} pairs -> {out_dir}")
    return results
