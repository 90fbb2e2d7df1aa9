"""Real photos in, full-resolution video out: the animate path with face crops and paste-back, for
every registered model, the command line, and reconstruction of videos not yet cropped."""
import logging
import os

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from animate import Animation, animate
from checkpoint import save_checkpoint_atomic
from conftest import write_video
from datasets.cropped_video import CroppedVideoReader
from datasets.frames_dataset import image_to_tensor
from datasets.video_io import VideoReader
from modules.registry import build_model, get_model_class, load_config, registered_models

TINY_FOMM = ["dataset_params.frame_shape=[32, 32, 3]", "dataset_params.synthetic=null",
             "model_params.common_params.num_kp=4", "animate_params.batch_size=6"]


@pytest.fixture(autouse=True)
def detector(face_detector):
    """Every test here crops real pictures: without a detector they would only pad them."""
    return face_detector


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, synthetic_portrait, drifting_frames):
    """A 208 x 256 portrait photo (png) with the face right of centre, and a 176 x 144 driving
    clip (12 frames at 10 fps, mp4) of another identity whose face drifts across the frame;
    plus the clip's first 4 frames (for the every-model test)."""
    folder = tmp_path_factory.mktemp("real")
    photo = synthetic_portrait[0]
    imageio.imwrite(str(folder / "photo.png"), photo)
    frames = drifting_frames[0]
    return {"photo": photo, "photo_path": str(folder / "photo.png"),
            "clip": write_video(str(folder / "drive.mp4"), frames, fps=10),
            "short": write_video(str(folder / "short.mp4"), frames[:4], fps=10)}


@pytest.fixture(scope="module")
def fomm():
    config = load_config("tiny-fomm.yaml", TINY_FOMM)
    torch.manual_seed(0)
    return build_model(config).eval(), config


def outside(crop, shape, margin=0):
    """Boolean H x W map of the pixels outside ``crop`` grown by ``margin`` (far from the face)."""
    left, top, side = crop
    far = np.ones(shape[:2], bool)
    far[max(0, top - margin):top + side + margin, max(0, left - margin):left + side + margin] = False
    return far


def test_photo_is_cropped_animated_and_pasted_back(fomm, inputs, tmp_path):
    model, _ = fomm
    photo = inputs["photo"]
    with Animation(model, inputs["photo_path"], inputs["clip"], crop="auto", paste_back=True,
                   batch_size=6) as animation:
        crop = animation.source.crop
        assert isinstance(animation.driving.reader, CroppedVideoReader)
        frames = list(animation.frames())
    left, top, side = crop
    assert 0 < side < 0.6 * min(photo.shape[:2])          # around the face, not the whole photo
    assert len(frames) == 12 and all(f.shape == photo.shape for f in frames)
    far = outside(crop, photo.shape)
    assert far.mean() > 0.6
    for frame in frames:
        difference = np.abs(frame.astype(int) - photo.astype(int))
        assert difference[far].max() <= 1                 # unchanged to 1/255 away from the face
    centre = (slice(top + side // 3, top + 2 * side // 3), slice(left + side // 3, left + 2 * side // 3))
    assert np.abs(frames[0][centre].astype(int) - photo[centre].astype(int)).mean() > 2  # animated
    info = animate(model, inputs["photo_path"], inputs["clip"], str(tmp_path / "out.mp4"),
                   crop="auto", paste_back=True, batch_size=6, progress=False)
    reader = VideoReader(info["path"])
    assert info["frames"] == len(reader) == 12 and reader.fps == pytest.approx(10)
    assert info["size"] == (208, 256) and reader[0].shape == photo.shape
    assert set(info["crop"]) == {"source", "driving"} and "crop track" in info["crop"]["driving"]


def test_crop_only_output_sizes_and_crop_none(fomm, inputs, tmp_path):
    model, _ = fomm
    with Animation(model, inputs["photo_path"], inputs["short"], result_size=48) as animation:
        frames = list(animation.frames())
    assert len(frames) == 4 and frames[0].shape == (48, 48, 3)
    with Animation(model, inputs["photo_path"], inputs["short"], crop="none") as animation:
        assert animation.source.crop is None and animation.source.note.endswith("(crop none)")
        assert not isinstance(animation.driving.reader, CroppedVideoReader)
        frames = list(animation.frames())
    assert frames[0].shape == (32, 32, 3)
    with pytest.raises(ValueError, match="result_size sets the size of the crop-only video"):
        animate(model, inputs["photo_path"], inputs["short"], str(tmp_path / "o.mp4"),
                paste_back=True, result_size=64)


def test_reference_search_and_motion_use_the_cropped_frames(fomm, inputs):
    model, _ = fomm
    with Animation(model, inputs["photo_path"], inputs["clip"], find_best_frame=True,
                   best_frame_by="model", adapt_scale=True) as animation:
        reader = animation.driving.reader
        index = animation.reference_index
        cropped = image_to_tensor(reader[index])[None]
        with torch.no_grad():
            expected = model.encode_driving(cropped)
        assert torch.allclose(animation.reference_state["kp"]["value"], expected["kp"]["value"])
        # the reference is the cropped driving frame nearest to the cropped source in pose
        with torch.no_grad():
            target = model.pose_descriptor(animation.source_state)
            distances = [float(((model.pose_descriptor(model.encode_driving(
                image_to_tensor(f)[None])) - target) ** 2).sum()) for f in reader]
        assert index == int(np.argmin(distances))
        assert len(list(animation.frames())) == 12


def tiny_model(name):
    cls = get_model_class(name)
    config = load_config(cls.tiny_config, ["dataset_params.synthetic=null"])
    torch.manual_seed(0)
    return build_model(config).eval()


@pytest.mark.parametrize("name", [n for n in registered_models() if get_model_class(n).animates])
def test_every_model_animates_a_real_photo_with_paste_back(name, inputs):
    model = tiny_model(name)
    photo = inputs["photo"]
    with Animation(model, photo, inputs["short"], paste_back=True, batch_size=4) as animation:
        assert animation.source.frame.shape[:2] == tuple(model.config["dataset_params"]
                                                         ["frame_shape"][:2])
        frames = list(animation.frames())
        crop = animation.source.crop
    assert len(frames) == 4 and all(f.shape == photo.shape for f in frames)
    far = outside(crop, photo.shape)
    assert max(np.abs(f.astype(int) - photo.astype(int))[far].max() for f in frames) <= 1


def test_command_line_paste_back_and_result_size(fomm, inputs, tmp_path, capsys):
    import run
    _, config = fomm
    checkpoint = str(tmp_path / "run" / "checkpoint_latest.pth")
    save_checkpoint_atomic({"model": "fomm", "state_dict": fomm[0].state_dict()}, checkpoint)
    sets = sum((["--set", s] for s in TINY_FOMM), [])
    common = ["--config", "tiny-fomm", "--mode", "animate", "--checkpoint", checkpoint,
              "--source_image", inputs["photo_path"], "--driving_video", inputs["short"], *sets]
    assert run.main([*common, "--paste_back", "--result_video", str(tmp_path / "p.mp4")]) == 0
    out = capsys.readouterr().out
    assert "crop (source)" in out and "crop (driving)" in out and "4 frames of 208x256" in out
    assert VideoReader(str(tmp_path / "p.mp4"))[0].shape == (256, 208, 3)
    assert run.main([*common, "--result_size", "40", "--result_video", str(tmp_path / "c.mp4"),
                     "--face_index", "0"]) == 0
    assert "4 frames of 40x40" in capsys.readouterr().out
    assert run.main([*common, "--face_index", "3", "--result_video", str(tmp_path / "x.mp4")]) == 1
    assert "face_index 3 does not exist" in capsys.readouterr().err


def test_reconstruction_and_evaluation_crop_uncropped_videos(fomm, inputs, tmp_path, caplog):
    from datasets.frames_dataset import build_dataset
    from evaluation.cli import test_videos
    from reconstruction import reconstruct
    model, _ = fomm
    root = tmp_path / "raw"
    for split in ("train", "test"):
        os.makedirs(root / split)
        os.symlink(inputs["clip"], root / split / "id01#drive#000.mp4")
    config = load_config("tiny-fomm.yaml", [*TINY_FOMM, f"dataset_params.root_dir={root}",
                                            "dataset_params.id_sampling=false"])
    caplog.set_level(logging.INFO, logger="datasets.face_crop")
    metrics = reconstruct(model, build_dataset(config, is_train=False), str(tmp_path / "rec"),
                          "cpu", config["reconstruction_params"])
    entry = metrics["videos"]["id01#drive#000"]
    assert entry["frames"] == 12 and "face crop track" in entry["crop"]
    assert "crop: " in caplog.text and "id01#drive#000.mp4" in caplog.text
    # a video of the frame size is used as it is (and an mp4 streams through reconstruction)
    small = tmp_path / "small"
    squashed = list(VideoReader(inputs["clip"], (32, 32)))
    for split in ("train", "test"):
        os.makedirs(small / split)
        write_video(str(small / split / "id02#square#000.mp4"), squashed, fps=10)
    small_config = load_config("tiny-fomm.yaml", [*TINY_FOMM, f"dataset_params.root_dir={small}",
                                                  "dataset_params.id_sampling=false"])
    plain = reconstruct(model, build_dataset(small_config, is_train=False), str(tmp_path / "rec2"),
                        "cpu", small_config["reconstruction_params"])
    assert plain["videos"]["id02#square#000"]["frames"] == 12
    assert "crop" not in plain["videos"]["id02#square#000"]
    videos = test_videos(config, None)
    assert len(videos) == 1 and isinstance(videos[0][1], CroppedVideoReader)
    assert videos[0][1][0].shape == (32, 32, 3)
    plain = test_videos(config, None, crop="none")
    assert isinstance(plain[0][1], VideoReader)


@pytest.mark.slow
def test_paste_back_figure_command(fomm, tmp_path):
    from tools.paste_back_figure import make_figure
    path = make_figure(fomm[0], str(tmp_path / "figure.png"), frame_index=3, frames=6,
                       save_inputs=str(tmp_path / "inputs"))
    figure = imageio.imread(path)
    assert figure.shape[0] == 384 + 18 and figure.shape[1] > 3 * 300
    assert sorted(os.listdir(tmp_path / "inputs")) == ["drive.mp4", "photo.png"]
