"""Seed 002 Table 5 (landmark detectors, and the animation trained on each one's landmarks) on the
synthetic dataset.

    python benchmarks/landmark_detectors.py --detector_steps 300 --finetune_steps 150 \
        --steps 150 --out log/landmark_detectors

Detectors (rows):

* dlib: dlib's HOG face detector + 68-point predictor (modules/backends.py; the 64 px frames are
  upscaled to 256 for it);
* FAN: face-alignment's 2DFAN-4, when its weights are in the torch hub cache (else the row says
  why it is missing);
* FAN+DSNT: the ``landmarks`` model of tiny-landmarks.yaml (a small FAN-style stacked hourglass
  with a DSNT output, 74 points) trained with the regression loss on the ground truth of the
  training videos for ``--detector_steps``, then ``--finetune_steps`` more on pairs of
  consecutive frames, regression only;
* FAN+DSNT+SBR: the same first stage, then ``--finetune_steps`` on the same pairs with the
  regression AND the registration loss (the paper's fine-tuning on videos). Equal budgets: the
  two rows differ only by the registration loss;
* FAN+DSNT+SBR + One-Euro (extra row, detection scores only): its tracks smoothed over time
  (what ``tools/extract_landmarks.py --detector`` writes by default);
* ground truth: the renderer's landmarks, the ceiling.

For each: NME (% of the outer-eye-corner distance) and SMS (eq. 9, pixels of the 64 px frame,
summed over the 68 points and both axes) on the test videos against the ground truth; then an
``s2d`` model (68 points, as the paper's Table 5, trained with the perceptual loss only, as it
says) trained for ``--steps`` on that detector's landmark sidecars of the training videos and
scored on the test videos driven by that detector's landmarks, the source's too
(benchmarks/landmark_scores.py): L1, PSNR, SSIM and AKD against the ground truth.
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.harness import (budget_overrides, landmark_detector, markdown_table,  # noqa: E402
                                save_json, train_row)
from benchmarks.landmark_scores import (detection_scores, landmark_driven_scores,  # noqa: E402
                                        link_dataset, sidecar_landmarks)
from datasets.frames_dataset import build_dataset, split_videos  # noqa: E402
from modules.backends import Skipped, load_backend  # noqa: E402
from modules.landmark_sources import backend_landmarker, checkpoint_landmarker  # noqa: E402
from modules.registry import build_model, load_config  # noqa: E402
from tools.extract_landmarks import extract_folder, pixel_landmarker  # noqa: E402
from train import train  # noqa: E402

SMOOTHING = {"min_cutoff": 4.0, "beta": 40.0, "d_cutoff": 1.0, "fps": None}  # the tool's defaults
# the animation rows: 68 points, perceptual loss only (seed 002 section 4.3.2)
S2D_TABLE_5 = ["model_params.num_landmarks=68", "train_params.loss_weights.l1=0",
               "train_params.loss_weights.generator_gan=0", "train_params.loss_weights.parsing=0",
               "dataset_params.load_parsing=false"]


def finetune_row(config_name, overrides, out_dir, init_checkpoint, seed=0):
    """Train ``config_name`` into ``out_dir`` starting from ``init_checkpoint``'s weights (a
    finished run in ``out_dir`` is reused); returns (config, model in eval mode)."""
    config = load_config(config_name, overrides)
    checkpoint = os.path.join(out_dir, "checkpoint_latest.pth")
    if not os.path.isfile(checkpoint):
        torch.manual_seed(seed)
        model = build_model(config, training=True)
        train(config, model, build_dataset(config, True), out_dir, seed=seed,
              finetune_from=init_checkpoint)
    return config, build_model(config, checkpoint)


def train_detectors(args, root):
    """Checkpoints of the FAN+DSNT and FAN+DSNT+SBR detectors."""
    data = [f"dataset_params.root_dir={root}", "dataset_params.synthetic=null"]
    stage1 = os.path.join(args.out, "detector_stage1")
    train_row("tiny-landmarks.yaml", budget_overrides(args.detector_steps, args.batch_size) + data
              + ["train_params.loss_weights.registration=0", "dataset_params.max_frame_gap=null"],
              stage1, args.seed)
    checkpoints = {}
    for name, registration in (("FAN+DSNT", 0), ("FAN+DSNT+SBR", args.registration)):
        out = os.path.join(args.out, "detector_" + name.replace("+", "_"))
        finetune_row("tiny-landmarks.yaml", budget_overrides(args.finetune_steps, args.batch_size)
                     + data + [f"train_params.loss_weights.registration={registration}"], out,
                     os.path.join(stage1, "checkpoint_latest.pth"), args.seed)
        checkpoints[name] = os.path.join(out, "checkpoint_latest.pth")
    return checkpoints


def detectors(args, root):
    """``{row: (pixel landmarker or None, smoothing or None, note, train an s2d model)}``; the
    ground-truth row has no landmarker."""
    rows = {}
    for name in ("dlib", "fan"):
        backend = load_backend("landmarks", name)
        label = {"dlib": "dlib", "fan": "FAN"}[name]
        rows[label] = (pixel_landmarker(backend_landmarker(backend)), None, "", True) \
            if not isinstance(backend, Skipped) else (None, None, backend.reason, False)
    for name, checkpoint in train_detectors(args, root).items():
        rows[name] = (pixel_landmarker(checkpoint_landmarker(checkpoint)), None, "", True)
    rows["FAN+DSNT+SBR + One-Euro"] = (rows["FAN+DSNT+SBR"][0], SMOOTHING, "", False)
    rows["ground truth"] = (None, None, "", True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector_steps", type=int, default=300)
    parser.add_argument("--finetune_steps", type=int, default=150)
    parser.add_argument("--registration", type=float, default=10.0,
                        help="loss_weights.registration of the SBR fine-tuning")
    parser.add_argument("--steps", type=int, default=150, help="s2d training steps per row")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_animation", action="store_true",
                        help="detection scores only (no s2d training)")
    parser.add_argument("--out", default="log/landmark_detectors")
    args = parser.parse_args(argv)
    base = load_config("tiny-s2d.yaml")
    root = build_dataset(base, is_train=True).root_dir          # generated on first use
    test_videos = split_videos(root, is_train=False)
    akd_detector = landmark_detector()
    results, copy = {}, None
    for name, (landmarker, smoothing, note, animation) in detectors(args, root).items():
        if note:
            results[name] = {"note": note}
            print(f"{name}: skipped ({note})", flush=True)
            continue
        folder = root
        if landmarker is not None:
            folder = link_dataset(root, os.path.join(args.out, "data", name.replace(" ", "_")))
            extract_folder(root, landmarker, folder, progress=False, smoothing=smoothing)
        in_folder = lambda path: os.path.join(folder, "test", os.path.basename(path))  # noqa
        row = detection_scores(test_videos, lambda path: sidecar_landmarks(in_folder(path)))
        if animation and not args.no_animation:
            overrides = budget_overrides(args.steps, args.batch_size) + S2D_TABLE_5 + [
                f"dataset_params.root_dir={folder}", "dataset_params.synthetic=null"]
            out = os.path.join(args.out, "s2d_" + name.replace(" ", "_").replace("+", "_"))
            config, model, seconds = train_row("tiny-s2d.yaml", overrides, out, args.seed)
            scores = landmark_driven_scores(model, config, truth_of=lambda path: sidecar_landmarks(
                os.path.join(root, "test", os.path.basename(path))), detector=akd_detector)
            row.update(scores["model"], train_seconds=seconds)
            copy = scores["copy"]
        results[name] = row
        print(f"{name}: {row}", flush=True)
    save_json(results, args.out, "landmark_detectors.json")
    print(f"\nsynthetic 64x64 test videos; detectors trained {args.detector_steps} + "
          f"{args.finetune_steps} steps, s2d {args.steps} steps x batch {args.batch_size}, seed "
          f"{args.seed}; AKD by {akd_detector.name if akd_detector else 'none'}\n")
    print(detection_table(results))
    animated = {k: v for k, v in results.items() if "l1" in v}
    if animated:
        print()
        print(markdown_table(dict(animated, **{"copy source": dict(copy, train_seconds=0)}),
                             ("landmarks",)))


def detection_table(results):
    lines = ["| detector | NME (%) | SMS (px) | SMS of the truth (px) | no face |",
             "| --- | --- | --- | --- | --- |"]
    for name, row in results.items():
        if "nme" not in row:
            lines.append(f"| {name} | n/a | n/a | n/a | skipped: {row['note'][:70]} |")
            continue
        nme = "n/a" if math.isnan(row["nme"]) else f"{row['nme']:.2f}"
        lines.append(f"| {name} | {nme} | {row['sms']:.2f} | {row['sms_truth']:.2f} | "
                     f"{100 * row['missing']:.0f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    np.seterr(invalid="ignore")
    main()
