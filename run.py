"""Command-line entry: parse, load and validate the config, resolve the run folder, dispatch a mode.

    python run.py --config vox.yaml --mode train
    python run.py --config tiny-fomm.yaml --mode reconstruction --checkpoint log/.../checkpoint_latest.pth
    python run.py --config tiny-fomm.yaml --mode animate --checkpoint CKPT \
        --source_image face.png --driving_video drive.mp4 --result_video out.mp4
    python run.py --config tiny-s2d.yaml --mode animate --checkpoint CKPT \
        --source_image face.png --driving_landmarks lm.npz --result_video out.mp4

Every mode is ``function(args, config, run_dir, device)``; training runs it once per device.
"""
import argparse
import contextlib
import datetime
import importlib
import logging
import os
import socket
import sys

import torch

from config import ConfigError, resolve_config_path

# Mode name -> "module:function(args, config, run_dir, device)". A new mode is one line here.
MODES = {
    "train": "train:run_train",
    "reconstruction": "reconstruction:run_reconstruction",
    "animate": "animate:run_animate",
    "evaluate": "evaluation.cli:run_evaluate",
}


def build_parser():
    parser = argparse.ArgumentParser(
        description="One-shot face animation framework (FOMM-style): train, reconstruct, animate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="config path, or a name found in configs/ "
                        "(e.g. vox.yaml, tiny-fomm)")
    parser.add_argument("--mode", default="train", choices=sorted(MODES),
                        help="what to run")
    parser.add_argument("--log_dir", default="log", help="root folder for run folders")
    parser.add_argument("--run_name", default=None,
                        help="run folder name under --log_dir. Training: a new name starts a run "
                        "(from --checkpoint's weights when given: fine-tuning), an existing one "
                        "resumes it. Default: the checkpoint's folder, else config name + time")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint to resume training from, or to evaluate/animate with")
    parser.add_argument("--device_ids", default=None,
                        help="comma-separated GPU ids (one process each, DDP), or 'cpu'. Without "
                        "CUDA, N ids run N CPU processes on gloo. Default: 0 if CUDA else cpu")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--verbose", action="store_true",
                        help="print more (debug logging, full tracebacks)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, typed like the config's value, e.g. "
                        "--set train_params.batch_size=8 (repeatable)")
    parser.add_argument("--list_models", action="store_true", help="list registered models")
    animate = parser.add_argument_group("animate mode")
    animate.add_argument("--source_image", help="source portrait (any size, RGB/gray/RGBA)")
    animate.add_argument("--driving_video", help="driving video (.mp4/.gif/.mov or frame folder)")
    animate.add_argument("--driving_landmarks", default=None,
                         help="drive by a landmark file instead of a video (landmark-driven "
                         "models, e.g. s2d): .npy or .npz, T x 74|68 x 2 pixel coordinates")
    animate.add_argument("--landmarks_size", default=None,
                         help="frame size H,W (or one side) of --driving_landmarks' pixel "
                         "coordinates, when the file does not hold it ('frame_size' in an .npz)")
    animate.add_argument("--landmarks_fps", type=float, default=None,
                         help="frame rate of --driving_landmarks (default: the .npz's 'fps', "
                         "else animate_params.fps)")
    animate.add_argument("--result_video", default=None, help="output video path")
    animate.add_argument("--absolute", action="store_true",
                         help="absolute motion instead of relative (animate_params.relative)")
    animate.add_argument("--adapt_scale", action="store_true",
                         help="adapt movement scale to the source (relative mode)")
    animate.add_argument("--find_best_frame", action="store_true",
                         help="use the driving frame closest to the source as reference")
    animate.add_argument("--best_frame", type=int, default=None,
                         help="use this driving frame index as the reference")
    from datasets.cropped_video import CROP_MODES
    animate.add_argument("--crop", default="auto", choices=CROP_MODES,
                         help="face crop of real inputs (also for reconstruction and evaluate): "
                         "auto crops inputs whose size differs from the model's frame size "
                         "around the face (videos: a smoothed crop track) and uses inputs of the "
                         "frame size as they are; face crops every input; none resizes inputs "
                         "whole (docs/crop_and_paste.md)")
    animate.add_argument("--face_index", type=int, default=None,
                         help="which face of the source to animate, numbered from the left "
                         "(default: the largest)")
    animate.add_argument("--paste_back", action="store_true",
                         help="blend the animated face back into the source photo: the video has "
                         "the photo's resolution and background")
    animate.add_argument("--result_size", type=int, default=None,
                         help="side in pixels of the crop-only video (default: the model's frame "
                         "size); not with --paste_back")
    animate.add_argument("--edit", default=None,
                         help="edit the source instead of driving it (models with a head pose): "
                         "e.g. 'yaw=0,pitch=0' (frontalize), 'yaw+=20,jaw=10,exp[3]=1.5'")
    animate.add_argument("--edit_sweep", default=None,
                         help="a video of the source with one value swept, name:start:stop:steps, "
                         "e.g. yaw:-30:30:61 (on top of --edit)")
    animate.add_argument("--transfer", default="all", choices=("all", "pose", "expression"),
                         help="what the driving video transfers (facevid2vid, mmfa): everything, "
                         "only the head pose, or only the expression")
    animate.add_argument("--interpolate_expression", default=None, metavar="A,B",
                         help="mmfa: the source's expression moving from image A's to image B's "
                         "through the expression VAE (needs --vae_checkpoint)")
    animate.add_argument("--interpolation_steps", type=int, default=30,
                         help="frames of --interpolate_expression")
    animate.add_argument("--vae_checkpoint", default=None,
                         help="a trained mmfa_vae checkpoint for --interpolate_expression")
    return parser


def parse_device_ids(text):
    """['cpu'] or a list of ints; defaults to GPU 0 when CUDA is there."""
    if text is None:
        return [0] if torch.cuda.is_available() else ["cpu"]
    if text.strip().lower() == "cpu":
        return ["cpu"]
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--device_ids {text!r}: expected comma-separated integers or 'cpu'") \
            from None


def device_for(device_id):
    if device_id == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{device_id}")


def resolve_run_dir(args):
    """The one folder a run writes into: ``--log_dir/--run_name`` when named; else, with a
    checkpoint, the checkpoint's folder; else (training) ``--log_dir/<config>_<time>``."""
    if args.run_name:
        return os.path.join(args.log_dir, args.run_name)
    if args.checkpoint:
        return os.path.dirname(os.path.abspath(args.checkpoint))
    if args.mode != "train":
        raise ConfigError(f"--mode {args.mode} needs a trained model: pass --checkpoint PATH (a "
                          ".pth written by --mode train)")
    name = os.path.splitext(os.path.basename(args.config))[0]
    return os.path.join(args.log_dir,
                        f"{name}_{datetime.datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}")


def mode_function(mode):
    module_name, function_name = MODES[mode].split(":")
    return getattr(importlib.import_module(module_name), function_name)


# ----------------------------------------------------------------------------- training launch
def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, args, config, run_dir, device_ids, port):
    world_size = len(device_ids)
    use_cuda = torch.cuda.is_available() and device_ids[0] != "cpu"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo", rank=rank,
                                         world_size=world_size)
    try:
        device = device_for(device_ids[rank]) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        mode_function("train")(args, config, run_dir, device, rank=rank, world_size=world_size)
    finally:
        torch.distributed.destroy_process_group()


def launch_train(args, config, run_dir, device_ids):
    """Lock the run folder (one training at a time writes there; under torchrun rank 0 holds
    the lock), then train."""
    from logger import RunLock
    torchrun = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    holds_lock = not torchrun or int(os.environ.get("RANK", "0")) == 0
    with RunLock(run_dir) if holds_lock else contextlib.nullcontext():
        return _launch(args, config, run_dir, device_ids, torchrun)


def _launch(args, config, run_dir, device_ids, torchrun):
    """One process (single device), N spawned processes, or the process torchrun started."""
    run_train = mode_function("train")
    if torchrun:  # torchrun / multi-node
        use_cuda = torch.cuda.is_available()
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if use_cuda \
            else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        try:
            return run_train(args, config, run_dir, device, rank=rank, world_size=world)
        finally:
            torch.distributed.destroy_process_group()
    if len(device_ids) == 1:
        return run_train(args, config, run_dir, device_for(device_ids[0]))
    torch.multiprocessing.spawn(_worker, args=(args, config, run_dir, device_ids, _free_port()),
                                nprocs=len(device_ids), join=True)
    return run_dir


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from modules.registry import load_config, registered_models
    if args.list_models:
        print("\n".join(registered_models()))
        return 0
    if not args.config:
        build_parser().error("--config is required (a path or a name in configs/)")
    try:
        config = load_config(args.config, args.set)
        args.config = resolve_config_path(args.config)
        device_ids = parse_device_ids(args.device_ids)
        run_dir = resolve_run_dir(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        if args.mode == "train":
            launch_train(args, config, run_dir, device_ids)
        else:
            mode_function(args.mode)(args, config, run_dir, device_for(device_ids[0]))
    except (OSError, ValueError, ConfigError, RuntimeError) as error:
        # OSError: a missing input, a full disk, a read-only or locked run folder (the messages
        # name the file and the fix); --verbose shows the traceback
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
