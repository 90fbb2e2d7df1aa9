"""Seed 002 Table 4 (the sparse-to-dense model's motion-transfer ablation) on the synthetic data.

    python benchmarks/s2d_ablation.py --steps 150 --out log/s2d_ablation

Rows: the full model, no Add_Motion layer, no AdaIN layer, no local motion (no M_L1..3), each
from tiny-s2d.yaml with the 74-point layout (pupils and lids: what the local eye branches are for)
and, as in the paper's Table 4, the warped source alone as the generator's input
(``use_motion_input=false``); the extra row "Full model + F input" is Table 1's generator. Every
row trains ``--steps`` iterations of ``--batch_size`` from one seed with the same losses, then
reconstructs every test video (frame 0 is the source, every later frame a target, absolute motion)
driven by the ground-truth landmarks, which the source's landmarks come from too
(benchmarks/landmark_scores.py). Columns: held-out L1, PSNR, SSIM, AKD (harness detector vs. the
ground truth), training time; "Copy source" is the baseline of doing nothing.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import (budget_overrides, landmark_detector, markdown_table,  # noqa: E402
                                save_json, train_row)
from benchmarks.landmark_scores import landmark_driven_scores  # noqa: E402

TABLE_4 = ["model_params.num_landmarks=74", "model_params.s2d_params.use_motion_input=false"]
ROWS = {
    "Full model": [],
    "no Add_Motion layer": ["model_params.s2d_params.use_add_motion=false"],
    "no AdaIN layer": ["model_params.s2d_params.use_adain=false"],
    "no local motion": ["model_params.s2d_params.use_local_branches=false"],
    "Full model + F input": ["model_params.s2d_params.use_motion_input=true"],
}
DEFAULT_ROWS = list(ROWS)[:4]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                        help=f"comma-separated, from: {', '.join(ROWS)}")
    parser.add_argument("--out", default="log/s2d_ablation")
    args = parser.parse_args(argv)
    detector = landmark_detector()
    results, copy = {}, None
    for name in (r.strip() for r in args.rows.split(",")):
        overrides = budget_overrides(args.steps, args.batch_size) + TABLE_4 + ROWS[name]
        out = os.path.join(args.out, name.replace(" ", "_").replace("+", "plus"))
        config, model, seconds = train_row("tiny-s2d.yaml", overrides, out, args.seed)
        scores = landmark_driven_scores(model, config, detector=detector)
        results[name] = dict(scores["model"], train_seconds=seconds)
        copy = scores["copy"]
        print(f"{name}: {results[name]}", flush=True)
    results["Copy source"] = dict(copy, train_seconds=0)
    save_json(results, args.out, "s2d_ablation.json")
    print(f"\nheld-out reconstruction driven by ground-truth landmarks, synthetic 64x64, "
          f"{args.steps} steps x batch {args.batch_size}, seed {args.seed}; AKD by "
          f"{detector.name if detector else 'no detector (none loads)'}\n")
    print(markdown_table(results, ("setting",)))


if __name__ == "__main__":
    main()
