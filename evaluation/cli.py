"""``python run.py --mode evaluate``: run a checkpoint over the test videos and write the tables."""
import json
import os

import torch

from atomic_files import write_atomically

from datasets.frames_dataset import build_dataset
from datasets.cropped_video import FaceCropper
from datasets.video_io import video_stem
from evaluation.metrics import MEAN_DEFINITION
from evaluation.protocols import DEFAULT_METRICS, MetricSuite, evaluate, model_animator
from evaluation.tables import write_tables
from modules.precision import SpeedSettings, prepare_inference
from modules.registry import build_model


def backend_options(params):
    """Per-backend options from ``evaluation_params`` (weights files the user supplies)."""
    options = {}
    if params["arcface_path"]:
        options[("identity", "arcface-onnx")] = {"model_path": params["arcface_path"]}
    if params["fid_inception_path"]:
        options[("fid", "pytorch-fid")] = {"weights_path": params["fid_inception_path"]}
    return options


def test_videos(config, num_videos, crop="auto"):
    """``(name, frames)`` of the test videos; videos not yet cropped to the frame size are cut
    by ``crop`` (datasets/cropped_video.py, which logs the crop used)."""
    dataset = build_dataset(config, is_train=False)
    cropper = FaceCropper(crop, config["dataset_params"]["frame_shape"][:2])
    paths = dataset.videos[:num_videos] if num_videos else dataset.videos
    return [(video_stem(p), cropper.video(p)) for p in paths]


def code_encoder(model):
    """The model's 3DMM encoder for AED/APD (models that have one expose ``encode_codes``)."""
    return getattr(model, "encode_codes", None)


@torch.no_grad()
def run_evaluate(args, config, run_dir, device):
    params = config["evaluation_params"]
    model = prepare_inference(build_model(config, args.checkpoint, device),
                              SpeedSettings.for_inference(config, "evaluation_params"), device)
    videos = test_videos(config, params["num_videos"], getattr(args, "crop", "auto"))
    suite = MetricSuite.build(metrics=tuple(params["metrics"] or DEFAULT_METRICS),
                              options=backend_options(params), encoder=code_encoder(model),
                              device=device, fid_method=params["fid_method"])
    results = evaluate(model_animator(model), videos, protocols=tuple(params["protocols"]),
                       suite=suite, batch_size=params["batch_size"],
                       pairs_per_video=params["pairs_per_video"], max_frames=params["max_frames"],
                       seed=args.seed, device=device)
    out_dir = os.path.join(run_dir, "evaluation")
    metadata = {"config": os.path.abspath(args.config), "checkpoint": os.path.abspath(args.checkpoint),
                "protocols": list(params["protocols"]),
                "dataset": os.path.abspath(config["dataset_params"]["root_dir"]),
                "videos": len(videos), "means": MEAN_DEFINITION}
    paths = write_tables(results, out_dir, metadata=metadata, method=config["model"])
    paths["timing"] = os.path.join(out_dir, "timing.json")  # where the time went, per part
    write_atomically(paths["timing"], lambda handle: handle.write(
        json.dumps(suite.timing.summary(), indent=2).encode()), what="timing")
    with open(paths["md"], encoding="utf-8") as handle:
        print(handle.read())
    print(f"tables: {', '.join(paths.values())}")
    return results
