"""Animation speed of one config at one or more precisions: frames/s of batched driving frames
with the source encoded once, FLOPs per frame, peak memory at half and at the full length.

    python benchmarks/animate_speed.py --config vox-fomm.yaml --frames 2048 --batch_size 64
    python benchmarks/animate_speed.py --config vox.yaml --precision bf16 --channels_last
    python benchmarks/animate_speed.py --config tiny-fomm.yaml --frames 64 --device cpu

What is timed is what ``animate.animate`` runs per batch of driving frames, through the same
inference wrapper (``modules.precision.prepare_inference``): the model's driving encoder, the
relative motion against a reference frame (``--absolute``: none) and the generator, the source's
state (keypoints, codes, encoder features) computed once before. Driving frames are random
images made on the device, so video decoding and encoding are not measured; ``--to_host`` adds
the copy of the frames to the host as uint8 (what a video writer needs). Weights are random
(``--checkpoint`` loads trained ones; the speed is the same).

Prints ``GFLOP per frame: X`` (torch's FLOP counter, steady state with the source cached, and
without the cache for comparison), frames/s, and the peak memory of the device's tensors after
half of the frames and after all of them: equal numbers mean memory does not grow with the
video's length.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.flops import (add_speed_arguments, count_flops, device_name,  # noqa: E402
                              known_peak_tflops, load_benchmark_config, peak_memory_mib,
                              print_table, reset_peak_memory, speed_settings, synchronize,
                              utilization)
from modules.precision import prepare_inference  # noqa: E402
from modules.registry import build_model  # noqa: E402

def driving_batches(count, batch_size, size, device, seed=0):
    """``count`` random driving frames in batches, made on ``device``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, count, batch_size):
        yield torch.rand(min(batch_size, count - start), 3, *size, generator=generator,
                         device=device)


def frame_flops(model, source_state, frames, reference_state, relative):
    """FLOPs per frame of the steady state: driving encoder + generate with the cached source."""
    flops, _ = count_flops(lambda: model.generate(
        source_state, model.encode_driving(frames), reference_state, relative=relative))
    return flops / frames.shape[0]


def measure(config, settings, args, device):
    torch.manual_seed(0)
    model = prepare_inference(build_model(config, args.checkpoint, device), settings, device)
    size = tuple(config["dataset_params"]["frame_shape"][:2])
    source = torch.rand(1, 3, *size, generator=torch.Generator(device=device).manual_seed(1),
                        device=device)
    source_state = model.encode_source(source)
    probe = next(driving_batches(args.batch_size, args.batch_size, size, device, seed=2))
    relative = not args.absolute
    reference_state = model.encode_driving(probe[:1]) if relative else None
    flops = frame_flops(model, source_state, probe, reference_state, relative)
    uncached = {k: v for k, v in source_state.items() if k != "features"} \
        if isinstance(source_state, dict) else source_state
    flops_uncached = frame_flops(model, uncached, probe, reference_state, relative)

    def run(count):
        for frames in driving_batches(count, args.batch_size, size, device, seed=3):
            prediction = model.generate(source_state, model.encode_driving(frames),
                                        reference_state, relative=relative)["prediction"]
            if args.to_host:
                prediction.mul(255).round_().to(torch.uint8).cpu()

    run(args.batch_size * args.warmup)                               # warm-up
    reset_peak_memory(device)
    half = max(args.batch_size, args.frames // 2)
    synchronize(device)
    start = time.perf_counter()
    run(half)
    synchronize(device)
    memory_half = peak_memory_mib(device) if device.type == "cuda" else None
    run(args.frames - half)
    synchronize(device)
    seconds = time.perf_counter() - start
    memory_all = peak_memory_mib(device) if device.type == "cuda" else None
    per_second = args.frames / seconds
    peak = args.peak_tflops or known_peak_tflops(device_name(device), settings.precision)
    memory = "n/a" if memory_half is None else f"{memory_half:.0f} / {memory_all:.0f}"
    return {"setting": settings.describe(), "batch": args.batch_size,
            "items_per_second": per_second, "ms_per_batch": 1000 * seconds * args.batch_size /
            args.frames, "memory": memory, "gflop": flops / 1e9,
            "gflop_uncached": flops_uncached / 1e9, "tflops": flops * per_second / 1e12,
            "peak_tflops": peak, "utilization": utilization(flops * per_second, peak)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_speed_arguments(parser)
    parser.add_argument("--frames", type=int, default=1024, help="driving frames to animate")
    parser.add_argument("--batch_size", type=int, default=64, help="driving frames per batch")
    parser.add_argument("--checkpoint", default=None, help="trained weights (default: random)")
    parser.add_argument("--absolute", action="store_true", help="absolute motion (no reference)")
    parser.add_argument("--to_host", action="store_true",
                        help="also copy every frame to the host as uint8")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up batches")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    config = load_benchmark_config(args.config, args.set)
    device = torch.device(args.device)
    shape = config["dataset_params"]["frame_shape"]
    rows = []
    for settings in speed_settings(args):
        row = measure(config, settings, args, device)
        rows.append(dict(row, run=f"animate {os.path.basename(args.config)} {shape[0]}px"))
        if not args.rows_only:
            print(f"{settings.describe()}: GFLOP per frame: {row['gflop']:.1f} (without the "
                  f"source cache: {row['gflop_uncached']:.1f}); "
                  f"{row['items_per_second']:.1f} frames/s")
    print_table(rows, args.rows_only,
                f"animation of {args.config} (model {config['model']}) on {device_name(device)}: "
                f"{args.frames} frames in batches of {args.batch_size}, "
                f"{'absolute' if args.absolute else 'relative'} motion; an item is one frame; "
                "peak MiB after half / all of the frames")
    return rows


if __name__ == "__main__":
    main()
