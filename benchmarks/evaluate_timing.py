"""Where the time of an evaluation goes: every default metric over N frames, time by part.

    python benchmarks/evaluate_timing.py --frames 160 --size 64
    python benchmarks/evaluate_timing.py --frames 2100 --size 64   # enough frames for FID

The "model" returns a slightly darkened copy of each driving frame (so every metric has a value
and the model costs nothing); the frames are the scikit-image astronaut's face, shifted by a few
pixels per frame. Metrics whose backend does not load here are listed as skipped. FID needs
more samples than its 2048 feature dimensions: with fewer frames it is skipped before any
Inception features are computed (they are most of the cost on a CPU).
"""
import argparse
import logging
import os
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation.protocols import DEFAULT_METRICS, MetricSuite, evaluate  # noqa: E402


def face_frames(count, size):
    from skimage import data as skdata
    face = np.asarray(Image.fromarray(skdata.astronaut()[0:320, 90:410]).resize((size, size)))
    return [np.roll(face, (t % 5 - 2, t % 3 - 1), axis=(0, 1)) for t in range(count)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=160, help="frames in all (4 videos)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    frames = face_frames(args.frames // 4, args.size)
    videos = [(f"id{i}#clip#0", frames) for i in range(4)]
    start = time.perf_counter()
    suite = MetricSuite.build(metrics=DEFAULT_METRICS)
    built = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate(lambda source, driving, reference=None: driving * 0.9 + 0.05, videos,
                      suite=suite, batch_size=args.batch_size, progress=False)[0]
    total = time.perf_counter() - start
    print(f"{4 * len(frames)} frames of {args.size}x{args.size}: backends loaded in {built:.1f} s, "
          f"evaluated in {total:.1f} s")
    print("\n".join(suite.timing.lines()))
    print("values: " + ", ".join(f"{k} {v:.4g}" for k, v in result.columns.items()))
    print("skipped: " + "; ".join(f"{k} ({v[:60]}...)" for k, v in result.skipped.items()))


if __name__ == "__main__":
    main()
