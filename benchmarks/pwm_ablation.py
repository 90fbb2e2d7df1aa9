"""Seed 001 Table 1 on the synthetic dataset: the four guidance kinds of the progressive-warping
model and FOMM, each trained with the same budget.

    python benchmarks/pwm_ablation.py --steps 150 --pretrain_steps 300 --out log/pwm_ablation

Rows: PWM with the geometric displacement, the neural codes, both, or NMFC as guidance
(tiny-pwm.yaml with ``pwm_params.guidance``), and FOMM (tiny-fomm.yaml). Every row trains
``--steps`` iterations of ``--batch_size`` from one seed on the same frames, without GAN terms
(the budget is far too small for them to matter; every row gets the same rule). The PWM rows
train on the dataset's exact FLAME codes and, at test time, fit the codes of the source and of
every driving frame with one shared 3DMM encoder pretrained for ``--pretrain_steps``
(tiny-pretrain-3dmm.yaml), as a user would; FOMM needs no encoder.

Columns, on the held-out videos:

- same identity (benchmarks/harness.py): frame 0 of each test video drives nothing (it is the
  source), every later frame is a target, absolute motion: L1, PSNR, SSIM, and AKD against the
  ground-truth landmarks.
- cross identity: frame 0 of each test video animated by the first ``--cross_frames`` frames of
  a test video of another identity, relative motion from the driver's frame 0 (FOMM's protocol;
  for PWM the codes' changes, ``flame.codes.relative_codes``). ID distance: the mean Euclidean
  distance between the dlib face-recognition embeddings (128-d; the first identity backend of
  modules/backends.py that loads) of each generated frame and of the source, on frames upscaled
  to 256 px; lower keeps the source's identity better. "ID missing" is the share of generated
  frames where dlib found no face (left out of the mean).

Limits of the ID distance here: the synthetic test split holds only 2 identities (4 videos), so
there are 4 cross pairs; the faces are 64 px renders upscaled 4x, far from the photographs dlib's
network was trained on, and dlib misses a sizeable share of them; two frames of the same
synthetic video are already about 0.25-0.3 apart and two identities about 0.35-0.55. Read it as
a coarse check that no row drifts towards the driver's identity (the "driving frame" row is the
distance of the driver itself to the source), not as CSIM.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.ablation import pretrain_tdmm  # noqa: E402
from benchmarks.harness import (DETECTOR_SIZE, budget_overrides, held_out_scores,  # noqa: E402
                                landmark_detector, markdown_table, save_json, train_row)
from datasets.frames_dataset import (build_dataset, identity_of, image_to_tensor,  # noqa: E402
                                     load_sidecars)
from modules.backends import Backend, first_available  # noqa: E402
from reconstruction import driving_input  # noqa: E402

PWM_ROWS = {
    "PWM + geom. disp.": "geom_disp",
    "PWM + neural codes": "neural_codes",
    "PWM + geom. disp. + neural codes": "both",
    "PWM + NMFC": "nmfc",
}
ROWS = {name: ("tiny-pwm.yaml", [f"model_params.pwm_params.guidance={kind}"])
        for name, kind in PWM_ROWS.items()}
ROWS["FOMM"] = ("tiny-fomm.yaml", [])
SAME_OBJECTIVE = ["train_params.loss_weights.generator_gan=0"]


def identity_embedder():
    embedder = first_available("identity", ["dlib", "arcface-onnx"])
    return embedder if isinstance(embedder, Backend) else None


def embeddings(embedder, images):
    """Identity embeddings of images upscaled to the detector size (NaN rows: no face)."""
    upscaled = F.interpolate(images.clamp(0, 1), size=(DETECTOR_SIZE, DETECTOR_SIZE),
                             mode="bicubic", align_corners=False).clamp(0, 1)
    return np.asarray(embedder(upscaled), dtype=np.float64)


def cross_pairs(videos):
    """(source video, driving video) pairs: each test video with the next one of another
    identity."""
    pairs = []
    for index, source in enumerate(videos):
        others = [v for v in videos[index + 1:] + videos[:index]
                  if identity_of(v) != identity_of(source)]
        if others:
            pairs.append((source, others[0]))
    return pairs


def read_frames(dataset, path, count):
    reader = dataset.reader(dataset.videos.index(path))
    frames = [image_to_tensor(frame) for _, frame in zip(range(count), iter(reader))]
    raw_size = reader.last_raw_size
    reader.close()
    return torch.stack(frames), raw_size


@torch.no_grad()
def cross_identity_scores(model, config, embedder, frames=8):
    """Mean ID distance (and missing share) of the model's cross-identity frames to their
    source, and of the driving frames themselves to the source (``driving``)."""
    dataset = build_dataset(config, is_train=False)
    distances = {"model": [], "driving": []}
    for source_path, driving_path in cross_pairs(dataset.videos):
        source, _ = read_frames(dataset, source_path, 1)
        driving, raw_size = read_frames(dataset, driving_path, frames)
        sidecars = load_sidecars(driving_path, model.driving_signal == "landmarks",
                                 model.driving_signal == "codes")
        signal = driving_input(model, driving, sidecars, list(range(len(driving))), raw_size)
        state = model.encode_source(source)
        driving_state = model.encode_driving(signal)
        reference = model.encode_driving(signal[:1])
        generated = model.generate(state, driving_state, reference,
                                   relative=True)["prediction"].clamp(0, 1)
        target = embeddings(embedder, source)[0]
        for key, images in (("model", generated), ("driving", driving)):
            distances[key].append(np.linalg.norm(embeddings(embedder, images) - target, axis=-1))
    out = {}
    for key, values in distances.items():
        per_frame = np.concatenate(values)
        found = np.isfinite(per_frame)
        out[key] = {"id_distance": float(per_frame[found].mean()) if found.any() else float("nan"),
                    "id_missing": float(1 - found.mean())}
    return out


def table(rows):
    """The harness's table plus the cross-identity columns."""
    lines = markdown_table(rows).split("\n")
    lines[0] += " ID distance (cross) | ID missing |"
    lines[1] += " --- | --- |"
    for index, row in enumerate(rows.values(), start=2):
        distance, missing = row.get("id_distance", float("nan")), row.get("id_missing",
                                                                         float("nan"))
        lines[index] += (f" {'n/a' if np.isnan(distance) else f'{distance:.3f}'} | "
                         f"{'n/a' if np.isnan(missing) else f'{100 * missing:.0f}%'} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--pretrain_steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--cross_frames", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--out", default="log/pwm_ablation")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",")]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    tdmm_checkpoint = pretrain_tdmm(args) if any(r in PWM_ROWS for r in rows) else None
    detector, embedder = landmark_detector(), identity_embedder()
    results, copy, driver = {}, None, None
    for name in rows:
        config_name, switches = ROWS[name]
        overrides = budget_overrides(args.steps, args.batch_size) + SAME_OBJECTIVE + switches
        if name in PWM_ROWS:
            overrides.append(f"model_params.tdmm_params.checkpoint={tdmm_checkpoint}")
        out = os.path.join(args.out, name.replace("+", "_").replace(" ", "_").replace(".", ""))
        config, model, seconds = train_row(config_name, overrides, out, args.seed)
        scores = held_out_scores(model, config, detector=detector)
        results[name] = dict(scores["model"], train_seconds=seconds)
        copy = scores["copy"]
        if embedder is not None:
            cross = cross_identity_scores(model, config, embedder, args.cross_frames)
            results[name].update(cross["model"])
            driver = cross["driving"]
        print(f"{name}: {results[name]}", flush=True)
    results["Copy source"] = dict(copy, train_seconds=0, id_distance=0.0, id_missing=0.0)
    if driver is not None:
        results["Driving frame (cross)"] = dict(
            {key: float("nan") for key in ("l1", "psnr", "ssim", "akd", "akd_missing")},
            train_seconds=0, **driver)
    save_json(results, args.out, "pwm_ablation.json")
    print(f"\nheld-out synthetic 64x64, {args.steps} steps x batch {args.batch_size}, seed "
          f"{args.seed}, 3DMM encoder pretrained {args.pretrain_steps} steps; AKD by "
          f"{detector.name if detector else 'no detector'}, ID distance by "
          f"{embedder.name if embedder else 'no identity backend'}\n")
    print(table(results))


if __name__ == "__main__":
    main()
