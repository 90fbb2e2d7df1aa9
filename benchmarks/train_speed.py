"""Training speed of one config at one or more precisions: images/s, peak memory, FLOPs per image,
achieved FLOP/s and the utilization of the GPU's peak.

    python benchmarks/train_speed.py --config vox-fomm.yaml --precision fp32 bf16 --batch_size 32
    python benchmarks/train_speed.py --config vox.yaml --precision bf16 --channels_last --compile
    python benchmarks/train_speed.py --config tiny-fomm.yaml --precision fp32 bf16 --device cpu

Runs the real training step (``train.train_step``: generator step, discriminator step when the
model has one, optimizer updates, under ``modules/precision.py``'s switches) on random frames of
the config's frame size, so data loading is not measured (``benchmarks/data_speed.py`` measures
the loader alone). The perceptual loss uses a random VGG-19 and the 3DMM encoder no ImageNet
file: the same FLOPs, no weight files needed. Each precision builds the model afresh from seed 0.

Columns (``benchmarks/flops.py``): images/s and ms per step (median over ``--runs`` runs of
``--iters`` steps, after ``--warmup`` steps); peak memory of the device's tensors (CUDA only);
GFLOP per image counted with torch's FLOP counter for the whole step (with the discriminator
step) and for the generator side alone (generator step, forward + backward: how FOMM's 534
GFLOP per image are counted); the achieved TFLOP/s of the whole step and the utilization against
``--peak_tflops`` or the table of known GPUs (fp32 against the TF32 peak).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.flops import (add_speed_arguments, count_flops, device_name,  # noqa: E402
                              known_peak_tflops, load_benchmark_config, peak_memory_mib,
                              print_table, reset_peak_memory, seconds_per_call, speed_settings,
                              utilization)
from modules.precision import StepPrecision, channels_last, prepare_model  # noqa: E402
from modules.registry import build_model  # noqa: E402
from train import build_optimizers, train_step  # noqa: E402

def random_batch(config, batch_size, device):
    """Random frames of the config's size and random landmarks (every sidecar a model may use)."""
    height, width = config["dataset_params"]["frame_shape"][:2]
    generator = torch.Generator().manual_seed(0)
    batch = {key: torch.rand(batch_size, 3, height, width, generator=generator)
             for key in ("source", "driving")}
    batch["source_landmarks"] = torch.rand(batch_size, 68, 2, generator=generator) * 2 - 1
    batch["driving_landmarks"] = torch.rand(batch_size, 68, 2, generator=generator) * 2 - 1
    return {k: v.to(device) for k, v in batch.items()}


def step_flops(model, batch, precision):
    """(generator-side FLOPs, whole-step FLOPs) of one training step: the generator step's
    forward and backward, plus the discriminator step's. No optimizer step is taken."""
    def generator_side():
        with precision.autocast():
            losses, generated = model.generator_step(batch)
        sum(losses.values()).backward()
        return {k: v.detach() if torch.is_tensor(v) else v for k, v in generated.items()}

    def discriminator_side(generated):
        with precision.autocast():
            losses = model.discriminator_step(batch, generated)
        if losses:
            sum(losses.values()).backward()

    generator_flops, generated = count_flops(generator_side)
    discriminator_flops = 0
    if model.discriminator_groups:
        discriminator_flops, _ = count_flops(lambda: discriminator_side(generated))
    model.zero_grad(set_to_none=True)
    return generator_flops, generator_flops + discriminator_flops


def measure(config, settings, batch_size, device, args):
    """One row of the table: the model built afresh, prepared, counted and timed."""
    torch.manual_seed(0)
    model = build_model(config, device=device, training=True)
    prepare_model(model, settings)
    optimizers = build_optimizers(model, config["train_params"])
    precision = StepPrecision(settings, device)
    batch = random_batch(config, batch_size, device)
    if settings.channels_last:
        batch = channels_last(batch)
    generator_flops, total_flops = step_flops(model, batch, precision)
    reset_peak_memory(device)
    seconds = seconds_per_call(
        lambda: train_step(model, model, optimizers, batch, precision=precision, check=False),
        device, args.warmup, args.iters, args.runs)
    peak = args.peak_tflops or known_peak_tflops(device_name(device), settings.precision)
    memory = f"{peak_memory_mib(device):.0f}" if device.type == "cuda" else "n/a"
    return {"setting": settings.describe(), "batch": batch_size,
            "items_per_second": batch_size / seconds, "ms_per_batch": 1000 * seconds,
            "memory": memory, "generator_gflop": generator_flops / batch_size / 1e9,
            "gflop": total_flops / batch_size / 1e9, "tflops": total_flops / seconds / 1e12,
            "peak_tflops": peak, "utilization": utilization(total_flops / seconds, peak)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_speed_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=None, help="default: the config's")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    config = load_benchmark_config(args.config, args.set)
    device = torch.device(args.device)
    batch_size = args.batch_size or config["train_params"]["batch_size"]
    shape = config["dataset_params"]["frame_shape"]
    rows = [dict(measure(config, settings, batch_size, device, args),
                 run=f"train {os.path.basename(args.config)} {shape[0]}px")
            for settings in speed_settings(args)]
    print_table(rows, args.rows_only,
                f"training step of {args.config} (model {config['model']}) on "
                f"{device_name(device)}, median of {args.runs} x {args.iters} steps after "
                f"{args.warmup}; an item is one generated image")
    return rows


if __name__ == "__main__":
    main()
