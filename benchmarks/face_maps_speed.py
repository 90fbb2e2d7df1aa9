"""Speed of SAFA's 3D face maps: barycentrics by autograd (the renderer's path) against PyTorch3D's
rasterizer backward (the former path), run interleaved in one process so that both see the same
machine load.

    python benchmarks/face_maps_speed.py                       # FaceMaps at 64 and 256 px, SAFA step
    python benchmarks/face_maps_speed.py --step_config ''      # FaceMaps only
    python benchmarks/face_maps_speed.py --sizes 256 --batch_size 4 --repeats 7

Part 1 times FaceMaps forward + backward (a loss on every map, gradients to every code and the
source image). Part 2 times the whole SAFA training step (train.train_step: generator and
discriminator steps with optimizer updates) on random frames of ``--step_config``'s frame size,
swapping only the face maps' renderer between the two paths. Prints medians over the repetitions
and the speed-up.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flame import FLAME, FaceCodes, ensure_open_head  # noqa: E402
from modules.face_maps import FaceMaps  # noqa: E402
from modules.renderer import Renderer  # noqa: E402


class PyTorch3DGradientRenderer(Renderer):
    """The former path: PyTorch3D's barycentrics with its C++ rasterizer backward."""
    rasterize = Renderer._rasterize_with_pytorch3d_gradients


def interleaved(runs, repeats):
    """{name: (median wall seconds, median CPU seconds of this process)} of the callables in
    ``runs``, called in turn ``repeats`` times. CPU time counts the work of all threads of this
    process, so it varies less than wall time on a machine shared with other work."""
    times = {name: ([], []) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            times[name][0].append(time.perf_counter() - wall)
            times[name][1].append(time.process_time() - cpu)
    return {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in times.items()}


def report(title, medians, repeats):
    (old, old_cpu), (new, new_cpu) = medians["pytorch3d backward"], medians["autograd barycentrics"]
    print(f"{title}, medians of {repeats}:\n"
          f"  wall: pytorch3d backward {old:.2f} s, autograd barycentrics {new:.2f} s, "
          f"speed-up {old / new:.2f}x\n"
          f"  cpu:  pytorch3d backward {old_cpu:.2f} s, autograd barycentrics {new_cpu:.2f} s, "
          f"speed-up {old_cpu / new_cpu:.2f}x")


def face_maps_inputs(batch_size, size):
    generator = torch.Generator().manual_seed(0)
    source = FaceCodes.zeros(batch_size, scale=7.0)
    source.shape[:, :10] = torch.randn(batch_size, 10, generator=generator)
    source.pose[:, 1] = torch.linspace(-0.4, 0.4, batch_size)
    driving = source.clone()
    driving.pose[:, 1], driving.pose[:, 3], driving.exp[:, :3] = -source.pose[:, 1], 0.15, 0.5
    image = torch.rand(batch_size, 3, size, size, generator=generator)
    return image, source, driving


def face_maps_pass(maps, image, source, driving):
    """Forward + backward; returns the maps and the gradients (for the equality check)."""
    codes = [c.clone() for c in (source, driving)]
    leaves = [getattr(c, name).requires_grad_(True) for c in codes
              for name in ("shape", "exp", "pose", "cam")] + [image.clone().requires_grad_(True)]
    out = maps(leaves[-1], *codes)
    keys = ("I_r", "normal_source", "normal_driving", "flow_3d", "heatmap_3d")
    sum((out[k] * (1 + i)).mean() for i, k in enumerate(keys)).backward()
    return [out[k].detach() for k in keys] + [t.grad for t in leaves]


def bench_face_maps(flame, size, batch_size, repeats):
    inputs = face_maps_inputs(batch_size, size)
    maps = {"pytorch3d backward": FaceMaps(flame, size, PyTorch3DGradientRenderer(flame.faces, size)),
            "autograd barycentrics": FaceMaps(flame, size, Renderer(flame.faces, size))}
    results = {name: face_maps_pass(m, *inputs) for name, m in maps.items()}   # also warms up
    worst = max(((a - b).norm() / b.norm().clamp_min(1e-12)).item()
                for a, b in zip(results["autograd barycentrics"], results["pytorch3d backward"]))
    medians = interleaved({name: (lambda m=m: face_maps_pass(m, *inputs))
                           for name, m in maps.items()}, repeats)
    report(f"FaceMaps forward+backward {size}x{size} batch {batch_size} (maps and gradients "
           f"differ by <= {worst:.1e} relative L2)", medians, repeats)


def bench_safa_step(config_path, overrides, batch_size, warmup, repeats):
    from benchmarks.train_speed import random_batch
    from modules.registry import build_model, load_config
    from train import build_optimizers, train_step

    config = load_config(config_path, overrides)
    torch.manual_seed(0)
    model = build_model(config).train()
    face_maps = model.face_maps
    renderers = {"pytorch3d backward": PyTorch3DGradientRenderer(face_maps.flame.faces,
                                                                 face_maps.image_size),
                 "autograd barycentrics": face_maps.renderer}
    optimizers = build_optimizers(model, config["train_params"])
    batch = random_batch(config, batch_size, torch.device("cpu"))

    def step_with(renderer):
        face_maps.renderer = renderer
        train_step(model, model, optimizers, batch)

    for _ in range(warmup):
        for renderer in renderers.values():
            step_with(renderer)
    medians = interleaved({name: (lambda r=r: step_with(r)) for name, r in renderers.items()},
                          repeats)
    height, width = config["dataset_params"]["frame_shape"][:2]
    report(f"SAFA train step {config_path} {height}x{width} batch {batch_size}", medians, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 256])
    parser.add_argument("--batch_size", type=int, default=2, help="FaceMaps batch")
    parser.add_argument("--repeats", type=int, default=5, help="FaceMaps repetitions per path")
    parser.add_argument("--step_config", default="configs/vox.yaml",
                        help="SAFA config for the train-step timing; '' skips it")
    parser.add_argument("--step_batch_size", type=int, default=2)
    parser.add_argument("--step_warmup", type=int, default=1)
    parser.add_argument("--step_repeats", type=int, default=3)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        default=["train_params.perceptual_pretrained=false"],
                        help="config overrides for the train step (default: a random VGG-19 for "
                        "the perceptual loss, as fast as the ImageNet one and needs no file)")
    args = parser.parse_args(argv)

    print(f"cpu, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    flame = FLAME.from_assets(ensure_open_head(), n_shape=100, n_exp=50)
    for size in args.sizes:
        bench_face_maps(flame, size, args.batch_size, args.repeats)
    if args.step_config:
        bench_safa_step(args.step_config, args.set, args.step_batch_size, args.step_warmup,
                        args.step_repeats)
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
