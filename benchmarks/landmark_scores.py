"""Held-out scores of landmark-driven models (``s2d``) and of landmark detectors on the synthetic
dataset, for benchmarks/s2d_ablation.py (seed 002 Table 4) and benchmarks/landmark_detectors.py
(Table 5).

``landmark_driven_scores`` is the same-identity reconstruction of ``harness.held_out_scores``
(frame 0 of each test video is the source, every later frame a target, absolute motion; L1, PSNR,
SSIM, AKD against the ground-truth landmarks) with one difference: the source's landmarks come
from the same track as the driving ones (a sidecar: ground truth, or one detector's output), as
they did in training, instead of a detector run by ``encode_source``.

``detection_scores`` compares a detector's tracks with the ground truth: NME (mean point-to-point
error over the 68 iBUG points divided by the outer-eye-corner distance, 36-45) and SMS (seed 002
eq. 9, ``evaluation.metrics.landmark_smoothness``, summed over the 68 points and both axes, in
pixels of the frame), and the share of frames without a face.
"""
import os

import numpy as np
import torch

from benchmarks.harness import detected_landmarks
from datasets.frames_dataset import build_dataset, image_to_tensor, load_sidecars
from evaluation.metrics import l1, landmark_smoothness, psnr, ssim
from modules.landmark_layout import NUM_IBUG
from modules.one_euro import hold_last_valid
from reconstruction import batched, driving_input

OUTER_EYE_CORNERS = (36, 45)


def sidecar_landmarks(path):
    """The landmark sidecar of a video (T x N x 2 pixels)."""
    return np.asarray(load_sidecars(path, True, False)["landmarks"], dtype=np.float32)


@torch.no_grad()
def landmark_driven_scores(model, config, landmarks_of=sidecar_landmarks,
                           truth_of=sidecar_landmarks, detector=None, batch_size=8):
    """``{"model": {...}, "copy": {...}}`` with keys l1, psnr, ssim, akd, akd_missing.

    ``landmarks_of(video_path)``: the track the model is driven by (T x N x 2 pixels; frames
    without a face repeat the last found one); ``truth_of``: the ground truth AKD compares with.
    """
    dataset = build_dataset(config, is_train=False)
    scores = {"model": [], "copy": []}
    distances = {"model": [], "copy": []}
    for index, path in enumerate(dataset.videos):
        reader = dataset.reader(index)
        frames = list(iter(reader))
        given = landmarks_of(path)
        track = {"landmarks": hold_last_valid(given, np.isfinite(given).all(axis=(1, 2)))}
        truth = truth_of(path)[:, :NUM_IBUG]
        source = image_to_tensor(frames[0])[None]
        state = model.encode_source(source, driving_input(model, source, track, [0],
                                                          reader.last_raw_size))
        for chunk in batched(list(range(1, len(frames))), batch_size):
            targets = torch.stack([image_to_tensor(frames[i]) for i in chunk])
            driving = model.encode_driving(driving_input(model, targets, track, chunk,
                                                         reader.last_raw_size))
            outputs = {"model": model.generate(state, driving)["prediction"].clamp(0, 1),
                       "copy": source.expand_as(targets)}
            for key, images in outputs.items():
                scores[key].append(torch.stack([l1(images, targets), psnr(images, targets),
                                                ssim(images, targets)], dim=1))
                if detector is not None:
                    found = detected_landmarks(detector, images)
                    distances[key].append(np.linalg.norm(found - truth[chunk], axis=-1).mean(-1))
        reader.close()
    return {key: summary(scores[key], distances[key]) for key in scores}


def summary(scores, distances):
    mean = torch.cat(scores).mean(dim=0).tolist()
    row = {"l1": mean[0], "psnr": mean[1], "ssim": mean[2], "akd": float("nan"),
           "akd_missing": float("nan")}
    if distances:
        per_frame = np.concatenate(distances)
        if np.isfinite(per_frame).any():
            row["akd"] = float(np.nanmean(per_frame))
        row["akd_missing"] = float(np.isnan(per_frame).mean())
    return row


def detection_scores(videos, landmarks_of, truth_of=sidecar_landmarks):
    """NME (%), SMS (pixels) and the missing-face rate of a detector's tracks on ``videos``,
    and the SMS of the ground truth itself (real motion is not perfectly smooth)."""
    errors, smoothness, truth_smoothness, missing = [], [], [], []
    for path in videos:
        found, truth = landmarks_of(path)[:, :NUM_IBUG], truth_of(path)[:, :NUM_IBUG]
        if len(found) != len(truth):
            raise ValueError(f"{path}: {len(found)} detected frames, {len(truth)} ground truth")
        ocular = np.linalg.norm(truth[:, OUTER_EYE_CORNERS[0]] - truth[:, OUTER_EYE_CORNERS[1]],
                                axis=-1)
        errors.append(np.linalg.norm(found - truth, axis=-1).mean(-1) / ocular)
        smoothness.append(landmark_smoothness(found))
        truth_smoothness.append(landmark_smoothness(truth))
        missing.append(~np.isfinite(found).all(axis=(1, 2)))
    errors = np.concatenate(errors)
    return {"nme": 100 * float(np.nanmean(errors)) if np.isfinite(errors).any() else float("nan"),
            "sms": float(np.nanmean(smoothness)), "sms_truth": float(np.nanmean(truth_smoothness)),
            "missing": float(np.concatenate(missing).mean())}


def link_dataset(source_root, target_root, suffixes=(".flame.npz", ".parsing.npy")):
    """``target_root/{train,test}`` with links to the videos of ``source_root`` and the sidecars
    named by ``suffixes`` (a detector's landmark sidecars then go next to them)."""
    for split in ("train", "test"):
        os.makedirs(os.path.join(target_root, split), exist_ok=True)
        for name in sorted(os.listdir(os.path.join(source_root, split))):
            if name.endswith(".landmarks.npy") or ("." in name and not name.endswith(suffixes)):
                continue
            link = os.path.join(target_root, split, name)
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(os.path.join(source_root, split, name)), link)
    return target_root


__all__ = ["sidecar_landmarks", "landmark_driven_scores", "detection_scores", "link_dataset"]
