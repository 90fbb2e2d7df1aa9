"""What the comparison benchmarks share: train a config for a fixed budget, then score the model on
the held-out synthetic videos.

Scores (same-identity reconstruction, seed 000 section 5.3: frame 0 of each test video is the
source, every later frame a target, absolute motion): L1, PSNR, SSIM, and AKD, the mean distance
in pixels between the 68 landmarks a detector finds on the generated frame and the ground-truth
landmarks of the target (the synthetic dataset knows them exactly). The detector is the first
landmark backend that loads (modules/backends.py: FAN, dlib); the 64 px frames are upscaled to
256 px for it, and frames where it finds no face are counted in ``akd_missing``. The same numbers
for "copy the source" are the baseline of doing nothing.
"""
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from datasets.frames_dataset import build_dataset, image_to_tensor, load_sidecars
from evaluation.metrics import l1, psnr, ssim
from modules.backends import Backend, first_available
from modules.registry import build_model, load_config
from reconstruction import batched, driving_input
from train import train

DETECTOR_SIZE = 256


def budget_overrides(steps, batch_size):
    """The same optimization budget for every row: steps x batch, one schedule, no checkpoints
    in between, no visuals."""
    return [f"train_params.batch_size={batch_size}", "train_params.num_epochs=100000",
            f"train_params.max_steps={steps}", "train_params.checkpoint_every_steps=0",
            "train_params.visual_every_steps=0", "train_params.epoch_milestones=[100000]",
            "train_params.num_workers=0"]


def train_row(config_name, overrides, out_dir, seed=0):
    """Train ``config_name`` with ``overrides`` into ``out_dir``; returns (config, model in eval
    mode, seconds). A finished run in ``out_dir`` is reused (the script can be re-run)."""
    config = load_config(config_name, overrides)
    checkpoint = os.path.join(out_dir, "checkpoint_latest.pth")
    start = time.perf_counter()
    if not os.path.isfile(checkpoint):
        torch.manual_seed(seed)
        model = build_model(config, training=True)
        train(config, model, build_dataset(config, True), out_dir, seed=seed)
    seconds = time.perf_counter() - start
    return config, build_model(config, checkpoint), seconds


def landmark_detector():
    detector = first_available("landmarks", ["fan", "dlib"])
    return detector if isinstance(detector, Backend) else None


def detected_landmarks(detector, images):
    """68 landmarks (pixels of ``images``) found on upscaled copies; NaN where none is found."""
    size = images.shape[-1]
    upscaled = F.interpolate(images.clamp(0, 1), size=(DETECTOR_SIZE, DETECTOR_SIZE),
                             mode="bicubic", align_corners=False).clamp(0, 1)
    points = np.asarray(detector(upscaled), dtype=np.float64)
    return (points + 0.5) * size / DETECTOR_SIZE - 0.5      # pixel centres back to our size


@torch.no_grad()
def held_out_scores(model, config, batch_size=8, detector=None):
    """Mean over the test frames of L1/PSNR/SSIM/AKD for the model and for copying the source.

    Returns ``{"model": {...}, "copy": {...}}`` with keys l1, psnr, ssim, akd, akd_missing.
    """
    dataset = build_dataset(config, is_train=False)
    scores = {"model": [], "copy": []}
    distances = {"model": [], "copy": []}
    for index in range(len(dataset.videos)):
        reader = dataset.reader(index)
        sidecars = load_sidecars(dataset.videos[index], True, True)
        source = image_to_tensor(reader[0])[None]
        state = model.encode_source(source)
        frames = list(enumerate(iter(reader)))[1:]   # frame 0 is the source
        for chunk in batched(frames, batch_size):
            indices = [i for i, _ in chunk]
            targets = torch.stack([image_to_tensor(f) for _, f in chunk])
            driving = model.encode_driving(driving_input(model, targets, sidecars, indices,
                                                         reader.last_raw_size))
            outputs = {"model": model.generate(state, driving)["prediction"].clamp(0, 1),
                       "copy": source.expand_as(targets)}
            truth = np.asarray(sidecars["landmarks"])[indices, :68]
            for key, images in outputs.items():
                scores[key].append(torch.stack([l1(images, targets), psnr(images, targets),
                                                ssim(images, targets)], dim=1))
                if detector is not None:
                    found = detected_landmarks(detector, images)
                    distances[key].append(np.linalg.norm(found - truth, axis=-1).mean(-1))
        reader.close()
    result = {}
    for key, values in scores.items():
        mean = torch.cat(values).mean(dim=0).tolist()
        row = {"l1": mean[0], "psnr": mean[1], "ssim": mean[2], "akd": float("nan"),
               "akd_missing": float("nan")}
        if distances[key]:
            per_frame = np.concatenate(distances[key])
            row["akd"] = float(np.nanmean(per_frame)) if np.isfinite(per_frame).any() \
                else float("nan")
            row["akd_missing"] = float(np.isnan(per_frame).mean())
        result[key] = row
    return result


def save_json(results, out_dir, name):
    """Write a benchmark's ``results`` to ``out_dir/name`` (folders made as needed)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)


def markdown_table(rows, title_columns=("row",)):
    """``{name: {l1, psnr, ssim, akd, akd_missing, train_seconds}}`` as a markdown table."""
    lines = ["| " + " | ".join(title_columns) + " | L1 | PSNR | SSIM | AKD (px) | AKD missing "
             "| train time (s) |",
             "| " + " | ".join("---" for _ in title_columns) + " | --- | --- | --- | --- | --- "
             "| --- |"]
    for name, r in rows.items():
        akd = "n/a" if np.isnan(r["akd"]) else f"{r['akd']:.2f}"
        missing = "n/a" if np.isnan(r["akd_missing"]) else f"{100 * r['akd_missing']:.0f}%"
        lines.append(f"| {name} | {r['l1']:.4f} | {r['psnr']:.2f} | {r['ssim']:.3f} | {akd} | "
                     f"{missing} | {r.get('train_seconds', 0):.0f} |")
    return "\n".join(lines)
