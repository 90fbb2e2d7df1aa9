"""Command-line entry: parse, load and validate the config, build the model, dispatch to a mode.

    python run.py --config vox.yaml --mode train
    python run.py --config tiny-fomm.yaml --mode reconstruction --checkpoint log/.../checkpoint_latest.pth
    python run.py --config tiny-fomm.yaml --mode animate --checkpoint CKPT \
        --source_image face.png --driving_video drive.mp4 --result_video out.mp4
"""
import argparse
import importlib
import logging
import os
import socket
import sys

import torch

from config import ConfigError, load_config, resolve_config_path

# Mode name -> "module:function(args, config)". A new mode is one line here plus its function.
MODES = {
    "train": "run:run_train",
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
                        help="run folder name under --log_dir (default: config name + timestamp)")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint to resume training from, or to evaluate/animate with")
    parser.add_argument("--device_ids", default=None,
                        help="comma-separated GPU ids (one process each, DDP), or 'cpu'. Without "
                        "CUDA, N ids run N CPU processes on gloo. Default: 0 if CUDA else cpu")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--verbose", action="store_true", help="print more (debug logging)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, typed like the config's value, e.g. "
                        "--set train_params.batch_size=8 (repeatable)")
    parser.add_argument("--list_models", action="store_true", help="list registered models")
    animate = parser.add_argument_group("animate mode")
    animate.add_argument("--source_image", help="source portrait (any size, RGB/gray/RGBA)")
    animate.add_argument("--driving_video", help="driving video (.mp4/.gif/.mov or frame folder)")
    animate.add_argument("--result_video", default=None, help="output video path")
    animate.add_argument("--absolute", action="store_true",
                         help="absolute motion instead of relative (animate_params.relative)")
    animate.add_argument("--adapt_scale", action="store_true",
                         help="adapt movement scale to the source (relative mode)")
    animate.add_argument("--find_best_frame", action="store_true",
                         help="use the driving frame closest to the source as reference")
    animate.add_argument("--best_frame", type=int, default=None,
                         help="use this driving frame index as the reference")
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


def run_train(args, config, rank=0, world_size=1, device=None):
    from datasets.frames_dataset import build_dataset
    from logger import CHECKPOINT_LATEST, make_log_dir
    from modules.registry import build_model
    from train import train
    torch.manual_seed(args.seed)
    dataset = build_dataset(config, is_train=True)
    model = build_model(config)
    if args.checkpoint and not args.resume_dir:
        log_dir = os.path.dirname(os.path.abspath(args.checkpoint))  # resume in the same folder
    else:
        log_dir = args.resume_dir or make_log_dir(args.log_dir, args.config, args.run_name)
    latest = os.path.join(log_dir, CHECKPOINT_LATEST)
    if not args.checkpoint and os.path.isfile(latest):  # a named run that was stopped: continue it
        args.checkpoint = latest
        if rank == 0:
            print(f"resuming from {latest} (the run folder already has a checkpoint)")
    if rank == 0:
        print(f"training {config['model']} on {len(dataset)} training entries; log dir {log_dir}")
    train(config, model, dataset, log_dir, checkpoint_path=args.checkpoint,
          device=device or torch.device("cpu"), rank=rank, world_size=world_size, seed=args.seed,
          verbose=args.verbose)
    return log_dir


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, args, config, device_ids, port):
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
        run_train(args, config, rank=rank, world_size=world_size, device=device)
    finally:
        torch.distributed.destroy_process_group()


def launch_train(args, config, device_ids):
    """One process (single device), N spawned processes, or the process torchrun started."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:  # torchrun / multi-node
        use_cuda = torch.cuda.is_available()
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if use_cuda \
            else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        try:
            return run_train(args, config, rank=rank, world_size=world, device=device)
        finally:
            torch.distributed.destroy_process_group()
    if len(device_ids) == 1:
        return run_train(args, config, device=device_for(device_ids[0]))
    from logger import make_log_dir
    args.resume_dir = args.resume_dir or (
        os.path.dirname(os.path.abspath(args.checkpoint)) if args.checkpoint
        else make_log_dir(args.log_dir, args.config, args.run_name))
    torch.multiprocessing.spawn(_worker, args=(args, config, device_ids, _free_port()),
                                nprocs=len(device_ids), join=True)
    return args.resume_dir


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.resume_dir = None
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.list_models:
        from modules.registry import registered_models
        print("\n".join(registered_models()))
        return 0
    if not args.config:
        build_parser().error("--config is required (a path or a name in configs/)")
    try:
        config = load_config(args.config, args.set)
        args.config = resolve_config_path(args.config)
        device_ids = parse_device_ids(args.device_ids)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    module_name, function_name = MODES[args.mode].split(":")
    try:
        if args.mode == "train":
            launch_train(args, config, device_ids)
        else:
            function = getattr(importlib.import_module(module_name), function_name)
            function(args, config, device=device_for(device_ids[0]))
    except (FileNotFoundError, ValueError, ConfigError, RuntimeError) as error:
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
