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


@torch.no_grad()
def animate(model, source_image, driving_video, output_path, relative=True, adapt_scale=False,
            best_frame=None, find_best_frame=False, device=None, batch_size=8, default_fps=25.0,
            progress=True, best_frame_by="auto"):
    """Write ``output_path``; returns a dict with frame count, fps, reference frame and audio flag.

    ``source_image`` is a path or an H x W x C uint8 array (any size; gray/RGBA converted).
    ``best_frame_by``: how ``find_best_frame`` compares frames: 'landmarks' (a face landmark
    detector), 'model' (the model's pose descriptor) or 'auto' (landmarks when a detector loads).
    """
    device = device or next(model.parameters()).device
    model.eval()
    size = model_frame_size(model)
    if isinstance(source_image, str):
        source_array = read_image(source_image, size)
    else:
        from datasets.video_io import to_rgb_uint8
        source_array = to_rgb_uint8(source_image, "source image", size)
    source = image_to_tensor(source_array)[None].to(device)
    source_state = model.encode_source(source)
    reader = VideoReader(driving_video, size)
    total = len(reader)
    if best_frame is not None:
        if not 0 <= best_frame < total:
            raise ValueError(f"--best_frame {best_frame} is outside the driving video "
                             f"{driving_video} (frames 0..{total - 1})")
        reference_index = best_frame
    elif find_best_frame and relative:
        reference_index = find_reference_frame(model, source_state, source_array, reader, device,
                                               batch_size, landmark_detector(best_frame_by))
    else:
        reference_index = 0
    reference_state = None
    if relative:
        reference = image_to_tensor(reader[reference_index])[None].to(device)
        reference_state = model.encode_driving(reference)
    out_fps = reader.fps or default_fps  # frame folders and stacked images have no fps
    silent_path = temporary_path(output_path)  # video without audio, before muxing
    written = 0
    try:
        with VideoWriter(silent_path, out_fps) as writer:
            bar = tqdm(total=total, desc="animate", disable=not progress)
            for chunk in batched(iter(reader), batch_size):
                driving = torch.stack([image_to_tensor(f) for f in chunk]).to(device)
                n = len(chunk)
                out = model.generate(source_state, model.encode_driving(driving),
                                     reference_state, relative=relative, adapt_scale=adapt_scale)
                for image in out["prediction"]:
                    writer.write(to_uint8_image(image))
                written += n
                bar.update(n)
            bar.close()
        audio = copy_audio(silent_path, driving_video, output_path)
    finally:
        reader.close()
        if os.path.exists(silent_path):
            os.remove(silent_path)
    return {"frames": written, "fps": out_fps, "reference_frame": reference_index, "audio": audio,
            "path": output_path}


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
    if args.source_image or args.driving_video:
        if not (args.source_image and args.driving_video):
            raise ValueError("animate needs both --source_image and --driving_video (or neither, "
                             "to animate the test set's pairs)")
        result = args.result_video or os.path.join(out_dir, "result.mp4")
        info = animate(model, args.source_image, args.driving_video, result, relative, adapt,
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
        results.append(animate(model, source_frame, pair["driving_video"],
                               os.path.join(out_dir, name + params["format"]), relative, adapt,
                               args.best_frame, find_best, device, params["batch_size"],
                               default_fps=params["fps"], progress=False,
                               best_frame_by=params["best_frame_by"]))
    print(f"animate: {len(results)} pairs -> {out_dir}")
    return results
