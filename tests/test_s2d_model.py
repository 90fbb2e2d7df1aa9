"""The s2d and landmarks models beyond the shared contract: landmark layouts, relative motion by
hand, pairs without landmarks, the parsing loss switch, Table 4's switches, source landmarks from a
trained detector checkpoint, driving by a landmark file (animate and the command line), and the
landmark extraction tool with a trained detector and One-Euro smoothing."""
import os

import numpy as np
import pytest
import torch

import run
from animate import DrivingLandmarks, animate, parse_frame_size
from checkpoint import make_checkpoint, save_checkpoint_atomic
from config import ConfigError
from datasets.frames_dataset import build_dataset, collate_items
from datasets.video_io import VideoReader
from modules.coords import normalized_to_pixels
from modules.landmark_sources import checkpoint_landmarker, load_landmarker, resize_images
from modules.registry import build_model, load_config
from tools import extract_landmarks

SMALL = ["dataset_params.frame_shape=[32, 32, 3]", "dataset_params.synthetic=null"]


def config_of(name, root, *overrides):
    return load_config(name, [f"dataset_params.root_dir={root}", *SMALL, *overrides])


@pytest.fixture(scope="module")
def detector_checkpoint(synthetic_root, tmp_path_factory):
    """An (untrained) 74-point landmarks model checkpoint, trained-size 32."""
    config = config_of("tiny-landmarks.yaml", synthetic_root)
    torch.manual_seed(0)
    model = build_model(config)
    path = str(tmp_path_factory.mktemp("detector") / "checkpoint_latest.pth")
    save_checkpoint_atomic(make_checkpoint(model, {}, {}, 0, 0, 0, config), path)
    return path


@pytest.fixture(scope="module")
def s2d(synthetic_root, detector_checkpoint):
    """A 32 px s2d model (74 points) whose source landmarks come from the detector checkpoint."""
    config = config_of("tiny-s2d.yaml", synthetic_root, "model_params.num_landmarks=74",
                       f"model_params.source_landmarks.checkpoint={detector_checkpoint}")
    torch.manual_seed(0)
    return config, build_model(config).eval()


@pytest.fixture(scope="module")
def batch(synthetic_root):
    config = config_of("tiny-s2d.yaml", synthetic_root)
    dataset = build_dataset(config, is_train=True)
    return collate_items([dataset[(i % len(dataset), i)] for i in range(3)])


# ----------------------------------------------------------------------------- landmarks
def test_landmark_layouts_and_their_errors(s2d, synthetic_root):
    _, model = s2d
    points = torch.rand(2, 74, 2) * 2 - 1
    assert model.layout(points, "x") is points
    config = config_of("tiny-s2d.yaml", synthetic_root)          # a 68-point model
    small = build_model(config)
    assert torch.equal(small.layout(points, "x"), points[:, :68])
    with pytest.raises(ValueError, match="68 points but this model takes 74"):
        model.layout(points[:, :68], "driving landmarks")
    with pytest.raises(ValueError, match="B x 68 or B x 74 x 2"):
        model.layout(points[:, :50], "source landmarks")
    with pytest.raises(ConfigError, match="finds 68 points"):
        config_of("tiny-s2d.yaml", synthetic_root, "model_params.num_landmarks=74",
                  "model_params.source_landmarks.detector=dlib")


def test_relative_motion_by_hand(s2d):
    _, model = s2d
    square = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    base = torch.zeros(1, 74, 2)

    def state(points):
        landmarks = base.clone()
        landmarks[0, :4] = points
        landmarks[0, 4:] = points.mean(0)                  # inside the hull
        return {"landmarks": landmarks}

    source, reference = state(0.2 * square), state(0.4 * square)     # source hull: 1/4 the area
    driving = state(0.4 * square + torch.tensor([0.1, -0.2]))
    moved = model.relative_motion(source, driving, reference)["landmarks"]
    torch.testing.assert_close(moved, source["landmarks"] + torch.tensor([0.1, -0.2]))
    scaled = model.relative_motion(source, driving, reference, adapt_scale=True)["landmarks"]
    torch.testing.assert_close(scaled, source["landmarks"] + 0.5 * torch.tensor([0.1, -0.2]))


def test_pose_descriptor_ignores_position_and_size(s2d):
    _, model = s2d
    points = torch.rand(1, 74, 2) - 0.5
    moved = {"landmarks": 0.5 * points + 0.3}
    torch.testing.assert_close(model.pose_descriptor({"landmarks": points}),
                               model.pose_descriptor(moved))
    other = points.clone()
    other[0, 48:68, 1] += 0.2                                           # the mouth opens
    assert not torch.allclose(model.pose_descriptor({"landmarks": other}),
                              model.pose_descriptor({"landmarks": points}))


def test_source_landmarks_from_a_detector_checkpoint(s2d, detector_checkpoint, batch):
    _, model = s2d
    images = batch["source"]
    detector = checkpoint_landmarker(detector_checkpoint)
    assert detector.num_landmarks == 74
    state = model.encode_source(images)
    torch.testing.assert_close(state["landmarks"], detector(images))
    given = torch.rand(3, 74, 2) - 0.5
    assert torch.equal(model.encode_source(images, given)["landmarks"], given)
    assert torch.equal(model.encode_driving(given)["landmarks"], given)
    torch.testing.assert_close(model.encode_driving(images)["landmarks"], state["landmarks"])
    # any image size: the detector sees images at the size it was trained at (32)
    large = resize_images(images, (64, 64))
    torch.testing.assert_close(detector(large), detector(resize_images(large, (32, 32))))
    not_a_detector = os.path.join(os.path.dirname(detector_checkpoint), "s2d.pth")
    save_checkpoint_atomic(make_checkpoint(model, {}, {}, 0, 0, 0, model.config), not_a_detector)
    with pytest.raises(ValueError, match="not a landmark detector"):
        load_landmarker("checkpoint", not_a_detector)


# ----------------------------------------------------------------------------- training
def test_pairs_without_landmarks_are_left_out(s2d, batch):
    _, model = s2d
    broken = dict(batch)
    broken["driving_landmarks"] = batch["driving_landmarks"].clone()
    broken["driving_landmarks"][1, 5] = float("nan")
    kept = model.usable_pairs(broken)
    assert len(kept["source"]) == 2 and kept["name"] == batch["name"]
    assert torch.equal(kept["driving"], batch["driving"][[0, 2]])
    _, generated = model.generator_step(broken)
    assert generated["prediction"].shape[0] == 2 and generated["driving"].shape[0] == 2
    broken["source_landmarks"] = torch.full_like(batch["source_landmarks"], float("nan"))
    with pytest.raises(ValueError, match="no pair of this batch has landmarks"):
        model.generator_step(broken)


def test_parsing_loss_switch_and_sidecar_check(synthetic_root, batch):
    config = config_of("tiny-s2d.yaml", synthetic_root)
    model = build_model(config, training=True)
    losses, _ = model.generator_step(batch)
    assert 0 < losses["parsing"].item() <= 10                       # weight 10 x a fraction
    assert "parsing" in model.sidecars(config)
    without = config_of("tiny-s2d.yaml", synthetic_root, "train_params.loss_weights.parsing=0",
                        "dataset_params.load_parsing=false")
    assert "parsing" not in build_model(without).generator_step(batch)[0]
    with pytest.raises(ConfigError, match="load_parsing"):
        config_of("tiny-s2d.yaml", synthetic_root, "dataset_params.load_parsing=false")


@pytest.mark.parametrize("switch", ["use_adain", "use_add_motion", "use_local_branches",
                                    "use_motion_input"])
def test_table_4_switches(synthetic_root, batch, switch):
    config = config_of("tiny-s2d.yaml", synthetic_root, f"model_params.s2d_params.{switch}=false")
    model = build_model(config, training=True)
    losses, generated = model.generator_step(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    modules = dict(model.named_modules())
    if switch == "use_adain":
        assert not any(type(m).__name__ == "AdaIN" for m in modules.values())
    if switch == "use_add_motion":
        assert not any(type(m).__name__ == "AddMotion" for m in modules.values())
    if switch == "use_local_branches":
        assert "local_masks" not in generated and not len(model.dense_motion.local_branches)
    if switch == "use_motion_input":
        assert model.generator.input_block.conv.in_channels == 3


def test_landmarks_model_losses(synthetic_root, batch):
    config = config_of("tiny-landmarks.yaml", synthetic_root)
    torch.manual_seed(0)
    model = build_model(config, training=True)
    frames = dict(batch, driving=batch["source"], driving_landmarks=batch["source_landmarks"])
    still, _ = model.generator_step(frames)             # the same frame twice: nothing to track
    assert float(still["registration"]) == 0.0 and float(still["regression"]) > 0
    moving, generated = model.generator_step(batch)
    assert float(moving["registration"]) > 0
    assert generated["source_detected"].shape == (3, 74, 2)
    # 68-point sidecars: the six extra points are not annotated
    short = dict(batch, source_landmarks=batch["source_landmarks"][:, :68],
                 driving_landmarks=batch["driving_landmarks"][:, :68])
    assert torch.isnan(model.targets(short["source_landmarks"])[:, 68:]).all()
    assert torch.isfinite(model.generator_step(short)[0]["regression"])
    with pytest.raises(ConfigError, match="max_frame_gap"):
        config_of("tiny-landmarks.yaml", synthetic_root, "dataset_params.max_frame_gap=null")


# ----------------------------------------------------------------------------- animation
def write_landmarks(path, synthetic_root, scale=1.0, **extra):
    video = sorted(f for f in os.listdir(os.path.join(synthetic_root, "test")) if "." not in f)[0]
    points = np.load(os.path.join(synthetic_root, "test", video + ".landmarks.npy"))
    if path.endswith(".npz"):
        np.savez(path, landmarks=points * scale, **extra)
    else:
        np.save(path, points * scale)
    return path, VideoReader(os.path.join(synthetic_root, "test", video))[0], len(points)


def test_animation_from_a_landmark_file_has_its_length_and_fps(s2d, synthetic_root, tmp_path):
    config, model = s2d
    small, source, length = write_landmarks(str(tmp_path / "small.npy"), synthetic_root)
    # the same landmarks in a frame twice as large, with size and fps in the file
    large, _, _ = write_landmarks(str(tmp_path / "large.npz"), synthetic_root, scale=2.0,
                                  frame_size=np.array([63, 63]), fps=12.5)    # 62 / 31 = 2
    info = animate(model, source, DrivingLandmarks(large), str(tmp_path / "large.mp4"),
                   relative=False, progress=False)
    assert info["frames"] == length and info["fps"] == 12.5
    video = VideoReader(str(tmp_path / "large.mp4"))
    assert len(video) == length and video.fps == pytest.approx(12.5)
    # the pixel coordinates of either file mean the same normalized landmarks
    driving = DrivingLandmarks(small, frame_size=(32, 32), fps=8)
    torch.testing.assert_close(driving.landmarks, DrivingLandmarks(large).landmarks)
    assert driving.fps == 8 and DrivingLandmarks(large, fps=30).fps == 30
    with pytest.raises(ValueError, match="landmarks_size"):
        DrivingLandmarks(small)


def test_landmark_file_gaps_and_errors(tmp_path):
    points = np.random.RandomState(0).rand(5, 68, 2).astype(np.float32) * 30
    points[2] = np.nan
    np.save(tmp_path / "gap.npy", points)
    driving = DrivingLandmarks(str(tmp_path / "gap.npy"), frame_size=(31, 31))
    assert driving.missing == 1 and driving.fps == 25.0
    torch.testing.assert_close(driving.landmarks[2], driving.landmarks[1])
    np.save(tmp_path / "bad.npy", points[:, :50])
    with pytest.raises(ValueError, match="68 \\(iBUG\\) or 74"):
        DrivingLandmarks(str(tmp_path / "bad.npy"), frame_size=(31, 31))
    np.savez(tmp_path / "bad.npz", points=points)
    with pytest.raises(ValueError, match="under 'landmarks'"):
        DrivingLandmarks(str(tmp_path / "bad.npz"))
    assert parse_frame_size("256") == (256, 256) and parse_frame_size("240,320") == (240, 320)
    with pytest.raises(ValueError, match="H,W"):
        parse_frame_size("big")


def test_animate_command_line_with_landmarks(s2d, synthetic_root, tmp_path):
    config, model = s2d
    checkpoint = str(tmp_path / "run" / "checkpoint_latest.pth")
    save_checkpoint_atomic(make_checkpoint(model, {}, {}, 0, 0, 0, config), checkpoint)
    path, source, length = write_landmarks(str(tmp_path / "drive.npy"), synthetic_root)
    import imageio.v2 as imageio
    imageio.imwrite(tmp_path / "face.png", source)
    out = str(tmp_path / "out.mp4")
    overrides = [f"dataset_params.root_dir={synthetic_root}", *SMALL,
                 "model_params.num_landmarks=74", "model_params.source_landmarks.checkpoint="
                 + config["model_params"]["source_landmarks"]["checkpoint"]]
    common = ["--config", "tiny-s2d.yaml", "--mode", "animate", "--checkpoint", checkpoint,
              "--source_image", str(tmp_path / "face.png"), "--result_video", out]
    common += [item for override in overrides for item in ("--set", override)]
    landmarks = ["--driving_landmarks", path, "--landmarks_size", "32", "--landmarks_fps", "10"]
    assert run.main(common + landmarks + ["--find_best_frame"]) == 0
    video = VideoReader(out)
    assert len(video) == length and video.fps == pytest.approx(10)
    assert run.main(common + landmarks + ["--driving_video", out]) == 1   # two driving sources


# ----------------------------------------------------------------------------- extraction tool
def test_extract_landmarks_with_a_trained_detector(detector_checkpoint, synthetic_root, tmp_path):
    video = sorted(f for f in os.listdir(os.path.join(synthetic_root, "test")) if "." not in f)[0]
    os.symlink(os.path.join(synthetic_root, "test", video), tmp_path / video)
    assert extract_landmarks.main(["--input", str(tmp_path / video), "--detector",
                                   detector_checkpoint, "--no-smooth", "--no-progress"]) == 0
    raw = np.load(tmp_path / (video + ".landmarks.npy"))
    frames = torch.stack([torch.from_numpy(f) for f in VideoReader(str(tmp_path / video))])
    expected = checkpoint_landmarker(detector_checkpoint)(frames.permute(0, 3, 1, 2) / 255.0)
    assert raw.shape == (len(frames), 74, 2)
    np.testing.assert_allclose(raw, normalized_to_pixels(expected.numpy(), 32, 32), atol=1e-4)
    # smoothed (the default with --detector): less jitter between frames, NaN rows kept
    assert extract_landmarks.main(["--input", str(tmp_path / video), "--detector",
                                   detector_checkpoint, "--overwrite", "--no-progress"]) == 0
    smoothed = np.load(tmp_path / (video + ".landmarks.npy"))
    jitter = lambda p: np.abs(p[:-2] + p[2:] - 2 * p[1:-1]).mean()       # noqa: E731
    assert jitter(smoothed) < jitter(raw)
    gappy = raw.copy()
    gappy[1] = np.nan
    track = extract_landmarks.smooth_track(gappy, (32, 32), 25.0, min_cutoff=4.0, beta=40.0,
                                           d_cutoff=1.0)
    assert np.isnan(track[1]).all() and np.isfinite(np.delete(track, 1, 0)).all()
    assert extract_landmarks.main(["--input", str(tmp_path), "--detector",
                                   str(tmp_path / "missing.pth")]) == 2
