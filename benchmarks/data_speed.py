"""Training-item speed of the video datasets: items/s for mp4 files and for frame folders.

    python benchmarks/data_speed.py --root data/data_speed --size 256 --workers 0 4 --items 64

Each item is what training reads: a (source, driving) pair of two random frames of one video,
decoded, resized if needed, flipped and colour-jittered with the VoxCeleb config's augmentation.
Without ``<root>/frames`` and ``<root>/mp4`` the script builds them first: ``--videos`` synthetic
talking-head videos of ``--frames`` frames (datasets.synthetic, frame folders), each also encoded
as H.264 mp4. Items are drawn through a DataLoader with 0 (main process) or N worker processes;
items/s counts every item from the loader's start (worker start-up included) and is the median
over ``--repeats`` passes. What readers cache between items (the frame count of each mp4) lives as
long as the process: with 0 workers across passes, as across epochs in training; with N workers
one pass (new workers per pass, as per epoch in training).
"""
import argparse
import os
import statistics
import sys
import time
import warnings

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.frames_dataset import FramesDataset  # noqa: E402
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


def items_per_second(dataset, workers, items, seed):
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(len(dataset), (items,), generator=generator).tolist()
    loader = DataLoader(dataset, batch_size=None, sampler=indices, num_workers=workers)
    start = time.perf_counter()
    count = sum(1 for _ in loader)
    return count / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/data_speed")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--items", type=int, default=64, help="items per pass")
    parser.add_argument("--repeats", type=int, default=3, help="passes per setting (median)")
    parser.add_argument("--videos", type=int, default=8, help="videos to build")
    parser.add_argument("--frames", type=int, default=100, help="frames per video to build")
    parser.add_argument("--layouts", nargs="+", default=["mp4", "folder"], choices=["mp4", "folder"])
    args = parser.parse_args(argv)

    # more workers than cores is a setting to measure here, not a mistake to warn about
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    roots = build_data(args.root, args.size, args.videos, args.frames)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} cpus")
    for layout in args.layouts:
        dataset = FramesDataset(roots[layout], frame_shape=(args.size, args.size, 3), is_train=True,
                                augmentation_params=AUGMENTATION)
        for workers in args.workers:
            rates = [items_per_second(dataset, workers, args.items, seed)
                     for seed in range(args.repeats)]
            print(f"{layout:6s} {args.size}x{args.size} {len(dataset)} videos, {workers} workers: "
                  f"{statistics.median(rates):7.2f} items/s  ({1000 / statistics.median(rates):.0f} "
                  f"ms/item; median of {args.repeats} passes of {args.items} items)")
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
