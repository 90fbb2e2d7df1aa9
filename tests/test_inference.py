"""Reconstruction and animation: frame counts, fps, audio, relative-motion identity, bad input."""
import copy
import json
import os
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from animate import animate
from conftest import moving_square_frames, write_video
from datasets.frames_dataset import build_dataset
from datasets.video_io import VideoReader, VideoReadError, has_audio
from checkpoint import save_checkpoint_atomic
from modules.coords import make_coordinate_grid
from modules.registry import build_model, load_config
from reconstruction import reconstruct

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["dataset_params.frame_shape=[32, 32, 3]", "dataset_params.synthetic=null",
        "model_params.common_params.num_kp=4", "reconstruction_params.batch_size=4",
        "animate_params.batch_size=4"]


@pytest.fixture
def tiny(tiny_dataset, tmp_path):
    """A tiny FOMM config on the fixture dataset and a checkpoint of its (untrained) weights."""
    config = load_config("tiny-fomm.yaml", [f"dataset_params.root_dir={tiny_dataset}", *TINY])
    torch.manual_seed(0)
    model = build_model(config)
    checkpoint = str(tmp_path / "run" / "checkpoint_latest.pth")
    save_checkpoint_atomic({"model": "fomm", "model_params": config["model_params"],
                            "state_dict": model.state_dict()}, checkpoint)
    return config, checkpoint


def video_with_audio(path, frames=12, fps=15, size=32):
    import imageio_ffmpeg
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi",
                    "-i", f"testsrc=size={size}x{size}:rate={fps}", "-f", "lavfi", "-i",
                    "sine=frequency=300", "-frames:v", str(frames), "-t", str(frames / fps),
                    "-pix_fmt", "yuv420p", path], check=True)
    return path


def test_reconstruction_writes_videos_pngs_and_l1(tiny, tmp_path):
    config, checkpoint = tiny
    model = build_model(config, checkpoint)
    dataset = build_dataset(config, is_train=False)
    metrics = reconstruct(model, dataset, str(tmp_path / "rec"), "cpu",
                          config["reconstruction_params"])
    assert len(metrics["videos"]) == len(dataset.videos) == 2
    for name, entry in metrics["videos"].items():
        assert entry["frames"] == 6 and 0 <= entry["l1"] <= 1
        assert len(VideoReader(str(tmp_path / "rec" / f"{name}.mp4"))) == 6
        assert len(os.listdir(tmp_path / "rec" / "png" / name)) == 6
    saved = json.load(open(tmp_path / "rec" / "metrics.json"))
    assert saved["mean_l1"] == pytest.approx(np.mean([v["l1"] for v in metrics["videos"].values()]))


def test_relative_motion_with_source_as_driving_is_identity_flow(tiny):
    config, checkpoint = tiny
    model = build_model(config, checkpoint)
    frame = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        source_state = model.encode_source(frame)
        driving = model.encode_driving(torch.rand(1, 3, 32, 32))
        out = model.generate(source_state, driving, reference_state=driving, relative=True)
    identity = make_coordinate_grid(*out["deformation"].shape[1:3])
    assert torch.allclose(out["deformation"][0], identity, atol=1e-5)
    assert torch.allclose(out["kp_driving"]["value"], source_state["kp"]["value"], atol=1e-6)


def test_animate_keeps_frame_count_fps_and_audio(tiny, tmp_path):
    config, checkpoint = tiny
    model = build_model(config, checkpoint)
    driving = video_with_audio(str(tmp_path / "drive.mp4"), frames=12, fps=15)
    source = np.random.RandomState(0).randint(0, 255, (45, 37)).astype(np.uint8)  # gray, odd size
    out = str(tmp_path / "out" / "result.mp4")
    info = animate(model, source, driving, out, relative=True, find_best_frame=True,
                   batch_size=5, progress=False)
    assert info["frames"] == 12 and info["audio"] and 0 <= info["reference_frame"] < 12
    reader = VideoReader(out)
    assert len(reader) == 12 and reader.fps == pytest.approx(15)
    assert has_audio(out)
    silent = write_video(str(tmp_path / "silent.mp4"), moving_square_frames(7, 32), fps=10)
    info = animate(model, source, silent, str(tmp_path / "silent_out.mp4"), relative=False,
                   progress=False)
    assert info["frames"] == 7 and not info["audio"] and VideoReader(info["path"]).fps == 10


def test_animate_bad_inputs(tiny, tmp_path):
    config, checkpoint = tiny
    model = build_model(config, checkpoint)
    source = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        animate(model, source, str(tmp_path / "missing.mp4"), str(tmp_path / "o.mp4"))
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"garbage" * 100)
    with pytest.raises(VideoReadError, match="corrupt.mp4"):
        animate(model, source, str(corrupt), str(tmp_path / "o.mp4"))
    with pytest.raises(FileNotFoundError, match="nosuch.png"):
        animate(model, str(tmp_path / "nosuch.png"), str(corrupt), str(tmp_path / "o.mp4"))
    driving = write_video(str(tmp_path / "d.gif"), moving_square_frames(4, 32))
    with pytest.raises(ValueError, match="best_frame 9"):
        animate(model, source, driving, str(tmp_path / "o.mp4"), best_frame=9)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".mp4") and f.startswith("tmp")]


# gray and gray+alpha conversions are tested in process (tests/test_datasets.py); the command
# line runs once by default, with an RGBA source
@pytest.mark.parametrize("channels", [pytest.param(1, marks=pytest.mark.slow),
                                      pytest.param(2, marks=pytest.mark.slow), 4])
def test_animate_cli_any_source_image(tiny, tmp_path, channels):
    config, checkpoint = tiny
    shape = (50, 41) if channels == 1 else (50, 41, channels)
    source = str(tmp_path / "source.png")
    imageio.imwrite(source, np.random.RandomState(1).randint(0, 255, shape).astype(np.uint8))
    driving = video_with_audio(str(tmp_path / "drive.mp4"), frames=5, fps=12)
    result = str(tmp_path / "cli.mp4")
    sets = sum((["--set", s] for s in [f"dataset_params.root_dir={config['dataset_params']['root_dir']}", *TINY]), [])
    proc = subprocess.run([sys.executable, os.path.join(REPO, "run.py"), "--config", "tiny-fomm",
                           "--mode", "animate", "--checkpoint", checkpoint, "--source_image", source,
                           "--driving_video", driving, "--result_video", result, *sets],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "5 frames" in proc.stdout and len(VideoReader(result)) == 5 and has_audio(result)


def test_inference_refuses_checkpoint_of_other_config(tiny, tmp_path):
    config, checkpoint = tiny
    other = copy.deepcopy(config)
    other["model_params"]["common_params"]["num_kp"] = 6
    with pytest.raises(ValueError, match="does not fit") as error:
        build_model(other, checkpoint)
    assert "model_params.common_params.num_kp" in str(error.value)  # names what differs


def test_evaluate_mode_writes_complete_tables(synthetic_root, tmp_path):
    """--mode evaluate on the synthetic dataset with a tiny checkpoint: every metric runs or says
    why it is skipped, and md, csv and json tables are written."""
    config = load_config("tiny-fomm.yaml", [f"dataset_params.root_dir={synthetic_root}", *TINY])
    torch.manual_seed(0)
    checkpoint = str(tmp_path / "run" / "checkpoint_latest.pth")
    save_checkpoint_atomic({"model": "fomm", "state_dict": build_model(config).state_dict()},
                           checkpoint)
    sets = [f"dataset_params.root_dir={config['dataset_params']['root_dir']}", *TINY,
            "evaluation_params.protocols=[reconstruction, pairs]", "evaluation_params.max_frames=3",
            "evaluation_params.pairs_per_video=2", "evaluation_params.fid_method=eigh"]
    args = sum((["--set", s] for s in sets), [])
    proc = subprocess.run([sys.executable, os.path.join(REPO, "run.py"), "--config", "tiny-fomm",
                           "--mode", "evaluate", "--checkpoint", checkpoint, *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = os.path.join(os.path.dirname(checkpoint), "evaluation")
    assert sorted(os.listdir(out)) == ["metrics.csv", "metrics.json", "metrics.md", "timing.json"]
    table = json.load(open(os.path.join(out, "metrics.json")))
    text = json.dumps(table)
    for column in ("L1", "PSNR", "SSIM", "AKD", "FID"):
        assert column in text, column
    assert "reconstruction" in text and "pairs" in text and checkpoint in text
    rows = [line for line in open(os.path.join(out, "metrics.md")) if line.startswith("| fomm |")]
    assert rows
    l1_value = float(rows[-1].split("|")[2])  # the L1 column of a protocol row: a real number
    assert 0 < l1_value < 1


def test_normalized_landmarks_ignore_position_and_size():
    from animate import normalized_landmarks
    points = np.random.RandomState(0).rand(68, 2) * 50
    moved = points * 2.5 + np.array([30.0, -7.0])
    assert np.allclose(normalized_landmarks(points), normalized_landmarks(moved), atol=1e-9)


def test_best_frame_found_by_face_landmarks(tmp_path):
    """With a landmark detector (dlib, offline), the reference is the driving frame whose
    normalized landmarks match the source's: here a shifted, enlarged copy of the source face."""
    import skimage.data
    from animate import find_reference_frame, landmark_detector
    from datasets.video_io import resize_frame
    detector = landmark_detector("landmarks")
    face = skimage.data.astronaut()[0:256, 110:366]                        # her face, 256 x 256
    source = resize_frame(face, (128, 128))
    frames = [resize_frame(np.ascontiguousarray(face[:, ::-1]), (128, 128)),   # mirrored
              resize_frame(np.rot90(face, 1).copy(), (128, 128)),              # turned over
              resize_frame(face[10:240, 20:250], (128, 128)),                  # zoomed, shifted
              resize_frame(np.rot90(face, 3).copy(), (128, 128))]
    path = write_video(str(tmp_path / "drive"), np.stack(frames))
    index = find_reference_frame(None, None, source, VideoReader(path, (128, 128)), "cpu",
                                 batch_size=2, detector=detector)
    assert index == 2


def test_edit_sequence_needs_an_editable_model_and_is_absolute(tiny, tmp_path):
    """--edit/--edit_sweep drive the source by edits: a model without a head pose says so; the
    sweep's length is the video's."""
    from animate import edit_sequence_from_args
    config, checkpoint = tiny
    sweep = edit_sequence_from_args("pitch=0", "yaw:-30:30:7", fps=10)
    assert len(sweep) == 7 and [e.yaw for e in sweep.edits] == [-30, -20, -10, 0, 10, 20, 30]
    assert all(e.pitch == 0 for e in sweep.edits)
    with pytest.raises(ValueError, match="edit_sweep"):
        edit_sequence_from_args(None, "yaw:-30:30")
    model = build_model(config, checkpoint)
    source = moving_square_frames(1, 32)[0]
    with pytest.raises(NotImplementedError, match="no editable head pose"):
        animate(model, source, sweep, str(tmp_path / "edit.mp4"), progress=False)
    assert not os.path.exists(tmp_path / "edit.mp4")
