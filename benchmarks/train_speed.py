"""Training speed of one model/config: iterations/s, images/s and peak memory, after warm-up.

    python benchmarks/train_speed.py --config vox-fomm.yaml --batch_size 8 --device cuda
    python benchmarks/train_speed.py --config tiny-fomm.yaml --batch_size 8 --device cpu

Runs the real training step (train.train_step: generator step, discriminator step, optimizer
updates) on random frames of the config's frame_shape, so data loading is not measured. Reports the
median over --runs runs of --iters iterations each.
"""
import argparse
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules.registry import load_config  # noqa: E402
from modules.registry import build_model  # noqa: E402
from train import build_optimizers, train_step  # noqa: E402


def random_batch(config, batch_size, device):
    height, width = config["dataset_params"]["frame_shape"][:2]
    generator = torch.Generator().manual_seed(0)
    batch = {key: torch.rand(batch_size, 3, height, width, generator=generator)
             for key in ("source", "driving")}
    batch["source_landmarks"] = torch.rand(batch_size, 68, 2, generator=generator) * 2 - 1
    batch["driving_landmarks"] = torch.rand(batch_size, 68, 2, generator=generator) * 2 - 1
    return {k: v.to(device) for k, v in batch.items()}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch_size", type=int, default=None, help="default: the config's")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--channels_last", action="store_true")
    args = parser.parse_args(argv)

    config = load_config(args.config, args.set)
    device = torch.device(args.device)
    batch_size = args.batch_size or config["train_params"]["batch_size"]
    torch.manual_seed(0)
    model = build_model(config).to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizers = build_optimizers(model, config["train_params"])
    batch = random_batch(config, batch_size, device)
    for _ in range(args.warmup):
        train_step(model, model, optimizers, batch)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.runs):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.iters):
            train_step(model, model, optimizers, batch)
        synchronize(device)
        times.append((time.perf_counter() - start) / args.iters)
    seconds = statistics.median(times)
    shape = config["dataset_params"]["frame_shape"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"config {args.config} model {config['model']} {shape[0]}x{shape[1]} batch {batch_size} "
          f"on {name} ({torch.get_num_threads()} threads)")
    print(f"  {1 / seconds:.3f} it/s  {batch_size / seconds:.2f} images/s  "
          f"{seconds * 1000:.1f} ms/it (median of {args.runs} x {args.iters})  "
          f"peak memory {peak_memory_mb(device):.0f} MiB")


if __name__ == "__main__":
    main()
