"""What the speed benchmarks share: FLOP counting, peak FLOP/s of known GPUs, timing, peak memory.

FLOPs are counted with torch's FLOP counter (``torch.utils.flop_counter.FlopCounterMode``): two
per multiply-add of every convolution, matrix product and attention, forward and backward (input
and weight gradients); elementwise work (activations, normalization, grid sampling, softmax) and
the C++ rasterizer are not counted. The counts do not depend on the precision.

Utilization (model-FLOPs utilization, MFU) = counted FLOPs / step time / peak FLOP/s of the GPU at
the run's precision: bf16 and fp16 against the dense 16-bit tensor-core peak, fp32 against the
TF32 peak (PyTorch lets cuDNN run float32 convolutions as TF32 by default, and convolutions are
nearly all of these models' FLOPs).
"""
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) peak TFLOP/s from the vendors' data sheets: (16-bit tensor, TF32 tensor).
# First match of a name fragment in torch.cuda.get_device_name() wins (so 'H100 PCIe' before 'H100').
KNOWN_PEAKS = [
    ("B200", (2250.0, 1100.0)),
    ("GH200", (989.4, 494.7)),
    ("H200", (989.4, 494.7)),
    ("H100 PCIe", (756.0, 378.0)),
    ("H100 NVL", (835.0, 417.5)),
    ("H100", (989.4, 494.7)),           # SXM
    ("A100", (312.0, 156.0)),
    ("L40S", (362.0, 183.0)),
    ("L40", (181.0, 90.5)),
    ("L4", (121.0, 60.0)),
    ("RTX 4090", (165.2, 82.6)),
    ("RTX 3090", (71.0, 35.6)),
    ("V100", (125.0, 15.7)),            # no TF32: float32 at its CUDA-core peak
]


def load_benchmark_config(name, overrides=()):
    """A config for speed runs: ``overrides`` (``--set``) applied, plus a random VGG-19 for the
    perceptual loss and no ImageNet file for the 3DMM encoder where the config has those keys
    (the same FLOPs and speed, no weight files needed)."""
    from modules.registry import load_config
    config = load_config(name, list(overrides))
    extra = []
    if "perceptual_pretrained" in config["train_params"]:
        extra.append("train_params.perceptual_pretrained=false")
    if "imagenet_init" in config["model_params"].get("tdmm_params", {}):
        extra.append("model_params.tdmm_params.imagenet_init=false")
    return load_config(name, list(overrides) + extra) if extra else config


def add_speed_arguments(parser):
    """The options every speed script takes: config overrides, device, the speed switches (one
    row per ``--precision``), the peak to compare with, and the table's form."""
    from modules.precision import PRECISIONS
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"],
                        choices=list(PRECISIONS), help="one row each")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile_mode", default=None, help="torch.compile's mode")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the GPU's peak TFLOP/s at the run's precision (default: the table "
                        "of known GPUs in benchmarks/flops.py)")
    parser.add_argument("--rows_only", action="store_true",
                        help="print only the table's rows (benchmarks/gpu_check.sh joins tables)")


def speed_settings(args):
    """One ``SpeedSettings`` per ``--precision`` of the parsed arguments."""
    from modules.precision import SpeedSettings
    options = {"mode": args.compile_mode} if args.compile_mode else {}
    return [SpeedSettings(precision, args.channels_last, args.compile, options)
            for precision in args.precision]


def known_peak_tflops(device_name, precision):
    """The table's peak for ``device_name`` at ``precision`` ('fp32' -> TF32), or None."""
    for fragment, (half, tf32) in KNOWN_PEAKS:
        if fragment.lower() in device_name.lower():
            return tf32 if precision == "fp32" else half
    return None


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device):
    """Peak memory of the device's tensors since the last reset (CUDA), or the process's peak
    resident memory (CPU: includes everything the process ever held)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # Linux: KiB


def count_flops(function):
    """(FLOPs counted while ``function()`` runs, its result)."""
    with FlopCounterMode(display=False) as counter:
        result = function()
    return counter.get_total_flops(), result


def seconds_per_call(function, device, warmup, iters, runs):
    """Median over ``runs`` of the mean wall time of ``iters`` calls, after ``warmup`` calls; the
    device is synchronized only around each run (no sync inside the timed calls)."""
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    for _ in range(runs):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            function()
        synchronize(device)
        times.append((time.perf_counter() - start) / iters)
    return sorted(times)[len(times) // 2]


def utilization(flops_per_second, peak_tflops):
    return None if not peak_tflops else flops_per_second / (peak_tflops * 1e12)


# One column layout for every speed script, so benchmarks/gpu_check.sh prints one table. An item
# is a generated image (training), a driving frame (animation) or a training pair (the loader).
COLUMNS = [("run", "run", "{}"), ("setting", "setting", "{}"), ("batch", "batch", "{}"),
           ("items/s", "items_per_second", "{:.4g}"), ("ms/batch", "ms_per_batch", "{:.1f}"),
           ("peak MiB", "memory", "{}"), ("GFLOP/item", "gflop", "{:.1f}"),
           ("GFLOP/item gen. side", "generator_gflop", "{:.1f}"), ("TFLOP/s", "tflops", "{:.3g}"),
           ("peak TFLOP/s", "peak_tflops", "{:.0f}"), ("utilization", "utilization", "{:.1%}")]


def print_table(rows, rows_only=False, title=None):
    """The rows as a markdown table (``rows_only``: without its header, for joining tables)."""
    lines = markdown(rows, COLUMNS).splitlines()
    if rows_only:
        lines = lines[2:]
    elif title:
        lines.insert(0, title)
    print("\n".join(lines))


def format_optional(value, pattern):
    return "n/a" if value is None else pattern.format(value)


def markdown(rows, columns=COLUMNS):
    """``rows`` (dicts) as a markdown table with ``columns`` [(title, key, format), ...]."""
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |",
             "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_optional(row.get(key), pattern)
                                       for _, key, pattern in columns) + " |")
    return "\n".join(lines)
