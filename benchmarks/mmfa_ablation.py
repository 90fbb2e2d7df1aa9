"""MMFA's ablation (seed 004, appendix C.4, Table 2) on the synthetic dataset, with face-vid2vid
as the baseline row, every row trained with the same budget.

    nice -n 10 python benchmarks/mmfa_ablation.py --steps 150 --batch_size 4 --out log/mmfa_ablation

Rows: the base model (MMFA without the representation, identity-consistency and landmark
losses), base + each of the three, the full model, and face-vid2vid (tiny-facevid2vid.yaml).
Two frozen parts are pretrained once and shared by every MMFA row, as the paper's are: the
3DMM encoder that gives the head rotation (``tiny-pretrain-3dmm.yaml``, ``--pretrain_steps``) and
the 74-point landmark detector of the landmark loss (trained here on the synthetic landmarks,
``--detector_steps``).

Scores, on the held-out synthetic videos:
- same identity (frame 0 drives nothing: it is the source; every later frame is a target,
  absolute motion): L1, PSNR, SSIM, AKD (benchmarks/harness.py);
- cross identity (frame 0 of each test video animated by another identity's video, relative
  motion): the identity distance, the mean Euclidean distance between the 128-d dlib face
  embeddings of the generated frames and of the source (dlib's own threshold for "same person"
  is 0.6; frames where dlib finds no face are counted in ``id_missing``);
- canonical-keypoint consistency: for each test video (one identity in many poses), the mean
  distance in pixels of every frame's canonical keypoints x_c from their mean over the video.
"""
import argparse
import itertools
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import (DETECTOR_SIZE, budget_overrides,  # noqa: E402
                                held_out_scores, landmark_detector, markdown_table, save_json,
                                train_row)
from datasets.frames_dataset import build_dataset, collate_items, identity_of  # noqa: E402
from datasets.frames_dataset import image_to_tensor  # noqa: E402
from modules.backends import Backend, first_available  # noqa: E402
from modules.landmark_detector import LandmarkDetector, landmark_regression_loss  # noqa: E402
from modules.registry import load_config  # noqa: E402
from reconstruction import batched  # noqa: E402

LOSSES = ("representation", "identity_consistency", "landmark")
ROWS = {
    "MMFA base": ("tiny-mmfa.yaml", ()),
    "+ representation": ("tiny-mmfa.yaml", ("representation",)),
    "+ identity consistency": ("tiny-mmfa.yaml", ("identity_consistency",)),
    "+ landmark": ("tiny-mmfa.yaml", ("landmark",)),
    "MMFA full": ("tiny-mmfa.yaml", LOSSES),
    "face-vid2vid": ("tiny-facevid2vid.yaml", None),
}
DETECTOR = {"num_landmarks": 74, "features": 32, "num_stacks": 2, "depth": 2}


# ----------------------------------------------------------------------------- pretraining
def pretrain_rotation(args):
    """The shared 3DMM encoder run whose global pose is every MMFA row's R."""
    out = os.path.join(args.out, "pretrain-3dmm")
    train_row("tiny-pretrain-3dmm.yaml", budget_overrides(args.pretrain_steps, 16), out, args.seed)
    return os.path.join(out, "checkpoint_latest.pth")


def pretrain_landmark_detector(args):
    """The 74-point detector of the landmark loss, trained on the synthetic landmark sidecars."""
    path = os.path.join(args.out, "landmark-detector", "detector.pth")
    if os.path.isfile(path):
        return path
    config = load_config("tiny-mmfa.yaml", ["dataset_params.load_landmarks=true"])
    dataset = build_dataset(config, is_train=True)
    torch.manual_seed(args.seed)
    detector = LandmarkDetector(**DETECTOR).train()
    optimizer = torch.optim.Adam(detector.parameters(), lr=1e-3)
    rng = np.random.RandomState(args.seed)
    for step in range(args.detector_steps):
        items = [dataset[(int(rng.randint(len(dataset))), step * 64 + i)] for i in range(8)]
        batch = collate_items(items)
        images = torch.cat([batch["source"], batch["driving"]])
        targets = torch.cat([batch["source_landmarks"], batch["driving_landmarks"]])
        loss = landmark_regression_loss(detector(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"landmark detector step {step}: loss {loss.item():.4f}", flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(detector.state_dict(), path)
    return path


def row_overrides(losses, rotation_checkpoint, detector_checkpoint):
    if losses is None:
        return []
    overrides = [f"model_params.rotation_params.checkpoint={rotation_checkpoint}",
                 "model_params.rotation_params.pretrained=true",
                 f"model_params.landmark_params.checkpoint={detector_checkpoint}",
                 "model_params.landmark_params.pretrained=true"]
    overrides += [f"model_params.landmark_params.{key}={value}" for key, value in DETECTOR.items()
                  if key != "num_landmarks"]
    overrides += [f"train_params.loss_weights.{name}=0" for name in LOSSES if name not in losses]
    return overrides


# ----------------------------------------------------------------------------- scores
def embed(identity, images):
    upscaled = F.interpolate(images.clamp(0, 1), size=(DETECTOR_SIZE, DETECTOR_SIZE),
                             mode="bicubic", align_corners=False).clamp(0, 1)
    return np.asarray(identity(upscaled), dtype=np.float64)


def read_video(dataset, index):
    reader = dataset.reader(index)
    frames = torch.stack([image_to_tensor(frame) for frame in iter(reader)])
    reader.close()
    return frames


@torch.no_grad()
def cross_identity_distance(model, dataset, identity, stride=3, batch_size=8):
    """Mean dlib embedding distance between cross-identity reenactments and their sources (every
    ``stride``-th driving frame, the reference frame 0 included)."""
    videos = dataset.videos
    distances = []
    for source_index, driving_index in itertools.permutations(range(len(videos)), 2):
        if identity_of(videos[source_index]) == identity_of(videos[driving_index]):
            continue
        source = read_video(dataset, source_index)[:1]
        driving = read_video(dataset, driving_index)
        state = model.encode_source(source)
        reference = model.encode_driving(driving[:1])
        source_embedding = embed(identity, source)[0]
        for chunk in batched(list(driving[::stride]), batch_size):
            generated = model.generate(state, model.encode_driving(torch.stack(chunk)), reference,
                                       relative=True)["prediction"]
            distances.append(np.linalg.norm(embed(identity, generated) - source_embedding,
                                            axis=1))
    distances = np.concatenate(distances)
    found = np.isfinite(distances)
    return {"id_distance": float(distances[found].mean()) if found.any() else float("nan"),
            "id_missing": float(1 - found.mean())}


@torch.no_grad()
def canonical_consistency(model, dataset):
    """Mean pixel distance of each frame's canonical keypoints from their mean over its video."""
    spreads = []
    for index in range(len(dataset.videos)):
        frames = read_video(dataset, index)
        canonical = model.kp_detector(frames)["value"][..., :2]          # image-plane part
        pixels = canonical * (frames.shape[-1] - 1) / 2
        spreads.append((pixels - pixels.mean(dim=0)).norm(dim=-1).mean().item())
    return float(np.mean(spreads))


def score_row(model, config, detector, identity, stride):
    scores = held_out_scores(model, config, detector=detector)
    test = build_dataset(config, is_train=False)
    row = dict(scores["model"])
    row.update(cross_identity_distance(model, test, identity, stride) if identity else
               {"id_distance": float("nan"), "id_missing": float("nan")})
    row["kp_consistency"] = canonical_consistency(model, test)
    return row, scores["copy"]


def table(rows):
    """The harness's table plus the cross-identity and canonical-keypoint columns."""
    lines = markdown_table(rows, ("row",)).split("\n")
    lines[0] += " ID distance (cross) | no face (cross) | x_c spread (px) |"
    lines[1] += " --- | --- | --- |"
    for line_index, row in enumerate(rows.values(), start=2):
        cells = [f"{row.get('id_distance', float('nan')):.3f}",
                 f"{100 * row.get('id_missing', float('nan')):.0f}%",
                 f"{row.get('kp_consistency', float('nan')):.2f}"]
        lines[line_index] += " " + " | ".join(c.replace("nan", "n/a").replace("n/a%", "n/a")
                                               for c in cells) + " |"
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--pretrain_steps", type=int, default=150)
    parser.add_argument("--detector_steps", type=int, default=300)
    parser.add_argument("--cross_stride", type=int, default=3,
                        help="cross-identity scores on every n-th driving frame")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--out", default="log/mmfa_ablation")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",")]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    rotation = pretrain_rotation(args)
    detector_path = pretrain_landmark_detector(args)
    detector = landmark_detector()
    identity = first_available("identity", ["dlib"])
    identity = identity if isinstance(identity, Backend) else None
    results, copy = {}, None
    for name in rows:
        config_name, losses = ROWS[name]
        overrides = budget_overrides(args.steps, args.batch_size) + \
            row_overrides(losses, rotation, detector_path)
        out = os.path.join(args.out, name.replace("+ ", "plus_").replace(" ", "_").replace(
            "-", ""))
        config, model, seconds = train_row(config_name, overrides, out, args.seed)
        results[name], copy = score_row(model, config, detector, identity, args.cross_stride)
        results[name]["train_seconds"] = seconds
        print(f"{name}: {results[name]}", flush=True)
    results["Copy source"] = dict(copy, train_seconds=0)
    save_json(results, args.out, "mmfa_ablation.json")
    print(f"\nsynthetic 64x64, {args.steps} steps x batch {args.batch_size}, seed {args.seed}; "
          f"AKD by {detector.name if detector else 'no detector'}, identity by "
          f"{'dlib' if identity else 'no identity network'}\n")
    print(table(results))


if __name__ == "__main__":
    main()
