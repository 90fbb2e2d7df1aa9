"""Speed of the training loader alone: batches/s for mp4 files and for frame folders, against the
training step's time, so one can tell which of the two bounds training.

    python benchmarks/data_speed.py --root data/data_speed --size 256 --workers 0 8 --batch_size 32
    python benchmarks/data_speed.py --size 256 --workers 8 --batch_size 32 --step_ms 180

Each item is what training reads: a (source, driving) pair of two random frames of one video,
decoded (only those two frames), resized if needed, flipped and color-jittered with the VoxCeleb
config's augmentation. Batches come from the training loader itself (``datasets.loader
.make_loader``: worker processes, prefetching, pinned memory on a GPU device) with per-item seeds
as the training sampler gives them. Without ``<root>/frames`` and ``<root>/mp4`` the script builds
them first: ``--videos`` synthetic talking-head videos of ``--frames`` frames (datasets.synthetic,
frame folders), each also encoded as H.264 mp4. Batches/s counts from the loader's start (worker
start-up included) and is the median over ``--repeats`` passes. What readers cache between items
(the frame count of each mp4) lives as long as the process: with 0 workers across passes, as
across epochs in training; with N workers one pass (new workers per pass).

``--step_ms``: the training step's time (``benchmarks/train_speed.py``'s ms/batch at the same
batch size); each line then says whether the loader or the step bounds training with that many
workers. ``--rows_only`` prints rows of ``benchmarks/flops.py``'s table (an item is a pair).
"""
import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.flops import print_table  # noqa: E402
from datasets.frames_dataset import FramesDataset  # noqa: E402
from datasets.loader import make_loader  # noqa: E402
from datasets.synthetic import ensure_synthetic_dataset  # noqa: E402
from datasets.video_io import VideoReader, VideoWriter  # noqa: E402

AUGMENTATION = {"flip_param": {"horizontal_flip": True, "time_flip": True},    # configs/vox.yaml
                "jitter_param": {"brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.1}}


def build_data(root, size, videos, frames):
    """<root>/frames (synthetic frame folders) and <root>/mp4 (the same videos as mp4)."""
    frames_root = ensure_synthetic_dataset(os.path.join(root, "frames"), size=size,
                                           train_videos=videos, test_videos=1, frames=frames,
                                           progress=True)
    for split in ("train", "test"):
        folder = os.path.join(root, "mp4", split)
        os.makedirs(folder, exist_ok=True)
        source = os.path.join(frames_root, split)
        for name in sorted(os.listdir(source)):
            target = os.path.join(folder, name + ".mp4")
            if not os.path.isdir(os.path.join(source, name)) or os.path.exists(target):
                continue
            reader = VideoReader(os.path.join(source, name))
            with VideoWriter(target, fps=25) as writer:
                for frame in reader:
                    writer.write(frame)
    return {"mp4": os.path.join(root, "mp4"), "folder": frames_root}


def batches_per_second(dataset, workers, batch_size, batches, seed, device):
    """Batches/s of the training loader over ``batches`` batches of random (index, seed) items."""
    generator = torch.Generator().manual_seed(seed)
    count = batch_size * batches
    indices = torch.randint(len(dataset), (count,), generator=generator).tolist()
    seeds = torch.randint(0, 2 ** 31 - 1, (count,), generator=generator).tolist()
    loader = make_loader(dataset, batch_size, list(zip(indices, seeds)), workers, device, seed)
    start = time.perf_counter()
    done = sum(1 for _ in loader)
    return done / (time.perf_counter() - start)


def verdict(batches_per_second, step_ms):
    """Which of loader and step bounds training, given the step's time."""
    loader_ms = 1000 / batches_per_second
    bound = "the loader" if loader_ms > step_ms else "the step"
    return f"{loader_ms:.0f} ms/batch vs step {step_ms:.0f} ms: training is bound by {bound}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/data_speed")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--batch_size", type=int, default=8, help="pairs per batch")
    parser.add_argument("--batches", type=int, default=8, help="batches per pass")
    parser.add_argument("--repeats", type=int, default=3, help="passes per setting (median)")
    parser.add_argument("--videos", type=int, default=8, help="videos to build")
    parser.add_argument("--frames", type=int, default=100, help="frames per video to build")
    parser.add_argument("--layouts", nargs="+", default=["mp4", "folder"], choices=["mp4", "folder"])
    parser.add_argument("--device", default="cpu",
                        help="the device training would feed: 'cuda' pins batches in memory")
    parser.add_argument("--step_ms", type=float, default=None,
                        help="the training step's time at --batch_size, to compare with")
    parser.add_argument("--rows_only", action="store_true",
                        help="print only rows of the speed table (benchmarks/gpu_check.sh)")
    args = parser.parse_args(argv)

    # more workers than cores is a setting to measure here, not a mistake to warn about
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    roots = build_data(args.root, args.size, args.videos, args.frames)
    if not args.rows_only:
        print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
              f"{os.cpu_count()} cpus")
    rows = []
    for layout in args.layouts:
        dataset = FramesDataset(roots[layout], frame_shape=(args.size, args.size, 3), is_train=True,
                                augmentation_params=AUGMENTATION)
        for workers in args.workers:
            rate = statistics.median(
                batches_per_second(dataset, workers, args.batch_size, args.batches, seed,
                                   args.device) for seed in range(args.repeats))
            rows.append({"run": f"loader {layout} {args.size}px", "setting": f"{workers} workers",
                         "batch": args.batch_size, "items_per_second": rate * args.batch_size,
                         "ms_per_batch": 1000 / rate})
            if not args.rows_only:
                line = (f"{layout:6s} {args.size}x{args.size} {len(dataset)} videos, {workers} "
                        f"workers: {rate:7.2f} batches/s of {args.batch_size} "
                        f"({rate * args.batch_size:.1f} pairs/s; median of {args.repeats} passes "
                        f"of {args.batches} batches)")
                if args.step_ms:
                    line += "; " + verdict(rate, args.step_ms)
                print(line)
    if args.rows_only:
        print_table(rows, rows_only=True)
    else:
        print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return rows


if __name__ == "__main__":
    main()
