"""Motion editing from Python and the command line for the 3D-keypoint models: pose-only and
expression-only transfer from a driving video, and MMFA's expression interpolation through the
VAE (animate.py's PartialMotionVideo and ExpressionInterpolation; run.py --transfer and
--interpolate_expression)."""
import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from animate import (ExpressionInterpolation, PartialMotionVideo, animate, frames_to_batch,
                     load_expression_vae)
from conftest import moving_square_frames, write_video
from datasets.video_io import VideoReader
from mmfa_helpers import mmfa_checkpoint, save_model, vae_config
from modules.registry import build_model, load_config

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    """An (untrained) tiny MMFA checkpoint and an expression VAE checkpoint built on its
    expression encoder."""
    folder = tmp_path_factory.mktemp("mmfa")
    config, mmfa_path = mmfa_checkpoint(folder)
    settings = vae_config(mmfa_path)
    vae = build_model(settings)
    vae.prepare_training(None)
    return config, mmfa_path, save_model(vae, settings, folder / "vae.pth"), folder


def images(folder, count=3, size=64):
    paths = []
    for index in range(count):
        array = np.random.RandomState(index).randint(0, 255, (size, size, 3)).astype(np.uint8)
        path = str(folder / f"image{index}.png")
        imageio.imwrite(path, array)
        paths.append(path)
    return paths


def test_partial_transfer_keeps_what_it_should(trained_pair, tmp_path):
    """A pose-only video animates the source with the driving pose and its own expression: the
    same frames as generating from driving states whose expression is the source's."""
    config, mmfa_path, _, _ = trained_pair
    model = build_model(config, mmfa_path)
    frames = moving_square_frames(4, 64)
    driving_path = write_video(str(tmp_path / "drive"), frames)
    source = frames[0]
    out = animate(model, source, PartialMotionVideo(driving_path, (64, 64), "pose"),
                  str(tmp_path / "pose.mp4"), relative=False, progress=False)
    assert out["frames"] == 4
    with torch.no_grad():
        source_state = model.encode_source(frames_to_batch([source], "cpu"))
        driving = model.encode_driving(frames_to_batch(list(frames), "cpu"))
        by_hand = model.generate(source_state, dict(
            driving, expression=source_state["expression"].expand(4, -1)))["prediction"]
        marked = model.generate(source_state, dict(driving, transfer="pose"))["prediction"]
    torch.testing.assert_close(marked, by_hand)
    fomm = build_model(load_config("tiny-fomm.yaml"))
    with pytest.raises(ValueError, match="supports all"):
        animate(fomm, source, PartialMotionVideo(driving_path, (64, 64), "expression"),
                str(tmp_path / "fomm.mp4"), progress=False)


def test_expression_interpolation_frames_start_and_end_at_the_two_expressions(trained_pair):
    config, mmfa_path, vae_path, folder = trained_pair
    model = build_model(config, mmfa_path)
    vae = load_expression_vae(vae_path)
    source_path, image_a, image_b = images(folder)
    driving = ExpressionInterpolation(vae, image_a, image_b, steps=5)
    driving.source_state = model.encode_source(frames_to_batch([imageio.imread(source_path)],
                                                                "cpu"))
    states = list(driving.states(model, batch_size=2, device="cpu"))
    assert [s["expression"].shape[0] for s in states] == [2, 2, 1]
    expression = torch.cat([s["expression"] for s in states])
    with torch.no_grad():
        ends = model.encode_expression(frames_to_batch([imageio.imread(image_a),
                                                        imageio.imread(image_b)], "cpu"))
    torch.testing.assert_close(expression[0], ends[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(expression[-1], ends[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(states[0]["rotation"][0], driving.source_state["rotation"][0])
    other = build_model(config)                       # another MMFA: its encoder differs
    with torch.no_grad():
        for parameter in other.expression_encoder.parameters():
            parameter.add_(0.01)
    with pytest.raises(ValueError, match="another MMFA model"):
        next(driving.states(other, 2, "cpu"))


def test_cli_transfer_and_interpolation(trained_pair, tmp_path, capsys):
    """run.py's flags, parsed and run in this process (run.main)."""
    import run
    config, mmfa_path, vae_path, folder = trained_pair
    source, image_a, image_b = images(folder)
    driving = write_video(str(tmp_path / "drive.gif"), moving_square_frames(3, 64))
    common = ["--config", "tiny-mmfa", "--mode", "animate", "--checkpoint", mmfa_path,
              "--source_image", source]
    result = str(tmp_path / "interpolated.mp4")
    assert run.main(common + ["--interpolate_expression", f"{image_a},{image_b}",
                              "--interpolation_steps", "4", "--vae_checkpoint", vae_path,
                              "--result_video", result]) == 0
    assert len(VideoReader(result)) == 4
    result = str(tmp_path / "expression.mp4")
    assert run.main(common + ["--driving_video", driving, "--transfer", "expression",
                              "--result_video", result]) == 0
    assert len(VideoReader(result)) == 3
    result = str(tmp_path / "turn.mp4")
    assert run.main(common + ["--edit", "pitch=0,roll=0", "--edit_sweep", "yaw:-20:20:3",
                              "--result_video", result]) == 0
    assert len(VideoReader(result)) == 3
    capsys.readouterr()
    assert run.main(common + ["--interpolate_expression", f"{image_a},{image_b}"]) == 1
    assert "--vae_checkpoint" in capsys.readouterr().err
