"""Every registered animation model (or the ones named) trained on the synthetic dataset with the
same CPU budget, scored on the held-out videos in one table.

    python benchmarks/compare.py --steps 300 --out log/compare
    python benchmarks/compare.py --models fomm,safa --steps 100

Each model trains from its tiny config (``tiny_config`` of its class: 64 x 64 frames, few
channels) for ``--steps`` iterations of ``--batch_size`` from one seed, then reconstructs every
test video (frame 0 drives nothing: it is the source; every later frame is a target). Columns:
held-out L1, PSNR, SSIM, AKD against the ground-truth landmarks (benchmarks/harness.py), and the
wall-clock training time (budgets are equal in steps, not seconds). "Copy source" is the baseline
of doing nothing. A new model gets its row by registering.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import (budget_overrides, held_out_scores, landmark_detector,  # noqa: E402
                                markdown_table, save_json, train_row)
from modules.registry import get_model_class, registered_models  # noqa: E402


def animation_models():
    return [name for name in registered_models() if get_model_class(name).animates]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None,
                        help="comma-separated model names (default: every animation model)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="log/compare")
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else animation_models()
    detector = landmark_detector()
    rows, copy = {}, None
    for name in names:
        cls = get_model_class(name)
        config, model, seconds = train_row(cls.tiny_config,
                                           budget_overrides(args.steps, args.batch_size),
                                           os.path.join(args.out, name), args.seed)
        scores = held_out_scores(model, config, detector=detector)
        rows[name] = dict(scores["model"], train_seconds=seconds)
        copy = scores["copy"]
        print(f"{name}: {rows[name]}", flush=True)
    rows["copy source"] = dict(copy, train_seconds=0)
    save_json(rows, args.out, "compare.json")
    print(f"\nheld-out reconstruction, synthetic 64x64, {args.steps} steps x batch "
          f"{args.batch_size}, seed {args.seed}; AKD by "
          f"{detector.name if detector else 'no detector (none loads)'}\n")
    print(markdown_table(rows, ("model",)))


if __name__ == "__main__":
    main()
