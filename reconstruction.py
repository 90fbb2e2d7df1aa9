"""Same-identity reconstruction of the test videos (seed 000 section 5.3).

Frame 0 of each test video is the source and every frame drives it (absolute motion). Frames are
streamed in and out in small batches, so memory does not grow with the video's length. Writes per
video an mp4 (prediction), optionally PNG frames, and ``metrics.json`` with per-video L1 and the
mean L1 over all frames (as ``--mode evaluate`` and the papers; the mean of the per-video means is
kept, named as such).
"""
import json
import os

import numpy as np
import torch
from tqdm import tqdm

from datasets.frames_dataset import image_to_tensor, load_sidecars
from datasets.video_io import VideoWriter, video_stem
from evaluation.metrics import MEAN_DEFINITION
from flame.codes import FaceCodes
from logger import to_uint8_image
from modules.coords import pixels_to_normalized


def batched(iterable, size):
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def video_sidecars(model, video_path):
    """The sidecars a model's driving signal comes from (none for models driven by frames)."""
    signal = model.driving_signal
    if signal == "frames":
        return {}
    return load_sidecars(video_path, load_landmarks=signal == "landmarks",
                         load_flame=signal == "codes")


def driving_input(model, frames, sidecars, indices, raw_size=None):
    """What ``model.encode_driving`` takes for these frames (its ``driving_signal``): the frames
    (B x 3 x H x W) themselves, their landmarks from the sidecar (B x K x 2, normalized; pixel
    coordinates of a video of ``raw_size`` (H, W) are rescaled), or their 3DMM codes."""
    signal = model.driving_signal
    if signal == "frames":
        return frames
    height, width = frames.shape[-2:]
    if signal == "landmarks":
        points = np.asarray(sidecars["landmarks"][indices], dtype=np.float32)
        if raw_size is not None and tuple(raw_size) != (height, width):
            points = points * ((np.array([width, height], np.float32) - 1)
                               / (np.array(raw_size[::-1], np.float32) - 1))
        return torch.as_tensor(pixels_to_normalized(points, height, width)).to(frames.device)
    return FaceCodes.from_numpy({k: v[indices] for k, v in sidecars["flame"].items()},
                                device=frames.device)


@torch.no_grad()
def reconstruct_video(model, reader, device, batch_size=8, writer=None, png_dir=None,
                      sidecars=None):
    """Reconstruct one video from its first frame; returns the mean L1 over its frames.
    ``sidecars``: the video's annotations, for models not driven by frames."""
    frames = iter(reader)
    first = next(frames)
    source = image_to_tensor(first)[None].to(device)
    source_state = model.encode_source(source)
    errors, index = [], 0

    def all_frames():
        yield first
        yield from frames

    for chunk in batched(all_frames(), batch_size):
        driving = torch.stack([image_to_tensor(f) for f in chunk]).to(device)
        signal = driving_input(model, driving, sidecars, list(range(index, index + len(chunk))),
                               reader.last_raw_size)
        prediction = model.generate(source_state, model.encode_driving(signal))["prediction"]
        errors.append(torch.abs(prediction - driving).mean(dim=(1, 2, 3)).cpu())
        for image in prediction:
            array = to_uint8_image(image)
            if writer is not None:
                writer.write(array)
            if png_dir is not None:
                from PIL import Image
                Image.fromarray(array).save(os.path.join(png_dir, f"{index:07d}.png"))
            index += 1
    return float(torch.cat(errors).mean()), index


def reconstruct(model, dataset, out_dir, device, params, crop="auto"):
    """Every test video (or the first ``num_videos``); returns the metrics dict it writes.
    ``crop``: how videos not yet cropped to the frame size are cut (datasets/cropped_video.py);
    the crop used is logged and kept in the metrics."""
    from datasets.cropped_video import FaceCropper, crop_sidecars
    os.makedirs(out_dir, exist_ok=True)
    count = len(dataset.videos)
    if params["num_videos"] is not None:
        count = min(count, params["num_videos"])
    per_video = {}
    cropper = FaceCropper(crop, dataset.frame_size)
    for i in tqdm(range(count), desc="reconstruction"):
        reader = cropper.video(dataset.video_path(i), dataset.on_mismatch)
        name = video_stem(dataset.video_path(i))
        png_dir = os.path.join(out_dir, "png", name) if params["save_png"] else None
        if png_dir:
            os.makedirs(png_dir, exist_ok=True)
        fps = reader.fps or params["fps"]
        with VideoWriter(os.path.join(out_dir, name + params["format"]), fps) as writer:
            sidecars = crop_sidecars(reader, video_sidecars(model, dataset.video_path(i)))
            l1, frames = reconstruct_video(model, reader, device, params["batch_size"], writer,
                                           png_dir, sidecars)
        reader.close()
        per_video[name] = {"l1": l1, "frames": frames}
        if getattr(reader, "note", ""):
            per_video[name]["crop"] = reader.note
    l1s, frames = [v["l1"] for v in per_video.values()], [v["frames"] for v in per_video.values()]
    metrics = {"protocol": "same-identity reconstruction, frame 0 as source",
               # one definition of the mean with evaluate's L1 column (evaluation/metrics.py)
               "mean_l1": float(np.average(l1s, weights=frames)), "means": MEAN_DEFINITION,
               "mean_l1_of_video_means": float(np.mean(l1s)),
               "videos": per_video}
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=2)
    return metrics


def run_reconstruction(args, config, run_dir, device):
    from datasets.frames_dataset import build_dataset
    from modules.registry import build_model
    from modules.precision import SpeedSettings, prepare_inference
    model = prepare_inference(build_model(config, args.checkpoint, device),
                              SpeedSettings.for_inference(config, "reconstruction_params"), device)
    dataset = build_dataset(config, is_train=False)
    out_dir = os.path.join(run_dir, "reconstruction")
    metrics = reconstruct(model, dataset, out_dir, device, config["reconstruction_params"],
                          crop=getattr(args, "crop", "auto"))
    print(f"reconstruction: mean L1 {metrics['mean_l1']:.4f} over the frames of "
          f"{len(metrics['videos'])} videos -> {out_dir}")
    return metrics
