"""The progressive-warping model (modules/models/pwm.py): training terms, the 3DMM encoder at
inference, relative codes, editing, smoothing and the command line, on 32 px synthetic data."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from animate import DrivingVideo, EditSequence, animate, frames_to_batch
from checkpoint import make_checkpoint, save_checkpoint_atomic
from datasets.frames_dataset import build_dataset, collate_items
from datasets.video_io import VideoReader, read_image
from flame.codes import FaceCodes
from modules.coords import make_coordinate_grid, warp
from modules.editing import FRONTAL, FaceEdit, angles_from_rotation, edit_codes, sweep_edits
from modules.model_base import expand_state
from modules.models.pwm import check_codes, warp_loss
from modules.one_euro import smooth_sequence
from modules.registry import build_model, load_config
from modules.renderer import weak_perspective
from pytorch3d.transforms import axis_angle_to_matrix

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32


def tiny_overrides(root):
    """tiny-pwm.yaml at 32 px on the session's synthetic dataset (one discriminator scale: the
    half-scale image is too small for 3 unpadded 4x4 blocks)."""
    return [f"dataset_params.root_dir={root}", "dataset_params.synthetic=null",
            f"dataset_params.frame_shape=[{SIZE}, {SIZE}, 3]",
            "model_params.pwm_params.render_size=null",
            "model_params.discriminator_params.scales=[1]",
            "model_params.generator_params.block_expansion=8",
            "model_params.generator_params.max_features=32"]


@pytest.fixture(scope="module")
def config(synthetic_root):
    return load_config("tiny-pwm.yaml", tiny_overrides(synthetic_root))


@pytest.fixture(scope="module")
def batch(config):
    dataset = build_dataset(config, is_train=True)
    return collate_items([dataset[(i, i)] for i in range(2)])


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    return build_model(config, training=True)


def tdmm_checkpoint(path, synthetic_root):
    """A 'tdmm' checkpoint whose encoder predicts non-neutral codes (a perturbed head)."""
    config = load_config("tiny-pretrain-3dmm.yaml", [
        f"dataset_params.root_dir={synthetic_root}", "dataset_params.synthetic=null",
        f"dataset_params.frame_shape=[{SIZE}, {SIZE}, 3]",
        "model_params.tdmm_params.imagenet_init=false"])
    torch.manual_seed(3)
    tdmm = build_model(config)
    with torch.no_grad():
        tdmm.encoder.head.weight.normal_(0, 0.02)
    save_checkpoint_atomic(make_checkpoint(tdmm, {}, {}, 0, 0, 0, config), str(path))
    return tdmm


# ----------------------------------------------------------------------------- training
def test_training_step_terms_shapes_and_groups(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    losses, generated = model.generator_step(batch)
    assert set(losses) == {"perceptual", "l1", "generator_gan", "feature_matching"}
    prediction = generated["prediction"]
    assert prediction.shape == (2, 3, SIZE, SIZE)
    # L1 weight 10 of the authors' code, on the output image
    torch.testing.assert_close(losses["l1"], 10 * (prediction - batch["driving"]).abs().mean())
    # 'both': 2 displacement + 16 code channels to the decoder, 16 to the encoder
    assert generated["guidance"].shape == (2, 18, SIZE, SIZE)
    assert generated["encoder_input"].shape == (2, 16, SIZE, SIZE)
    # num_levels 4: 3 PWMs estimate flows at 1/8, 1/4, 1/2 of the frame
    assert [tuple(f.shape) for f in generated["level_flows"]] == \
        [(2, SIZE // 8, SIZE // 8, 2), (2, SIZE // 4, SIZE // 4, 2), (2, SIZE // 2, SIZE // 2, 2)]
    sum(losses.values()).backward()
    groups = model.optimizer_groups()
    assert set(groups) == {"generator", "discriminator"}
    assert any(p is model.guidance.vertex_codes for p in groups["generator"])
    assert model.guidance.vertex_codes.grad.abs().sum() > 0
    encoder = {id(p) for p in model.tdmm.parameters()}
    assert not any(id(p) in encoder for params in groups.values() for p in params)
    assert all(p.grad is None for p in model.tdmm.parameters())
    d_losses = model.discriminator_step(batch, {"prediction": prediction.detach()})
    assert set(d_losses) == {"discriminator_gan"} and torch.isfinite(d_losses["discriminator_gan"])
    model.zero_grad(set_to_none=True)


def test_warp_loss_is_zero_for_the_right_flow_and_optional(config, batch):
    """The optional level-wise warping loss: 0 when each level's flow maps the source exactly
    onto the driving frame (a shifted copy), positive for the identity flow."""
    torch.manual_seed(0)
    source = torch.rand(1, 3, 16, 16).repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    shift = 4 * 2.0 / SIZE                                     # 4 pixels at 32 px
    grid = make_coordinate_grid(SIZE, SIZE)[None]
    flow = grid + torch.tensor([shift, 0.0])                   # sample 4 pixels to the right
    driving = warp(source, flow)
    identity = grid.expand(1, -1, -1, -1)
    assert float(warp_loss(source, driving, [flow])) < 1e-6
    assert float(warp_loss(source, driving, [identity])) > 0.05
    with_warp = load_config("tiny-pwm.yaml", tiny_overrides(config["dataset_params"]["root_dir"])
                            + ["train_params.loss_weights.warp=1"])
    losses, _ = build_model(with_warp, training=True).generator_step(batch)
    assert "warp" in losses and torch.isfinite(losses["warp"])


def test_batches_without_codes_or_with_other_sizes_are_refused(model, batch):
    no_codes = {k: v for k, v in batch.items() if k != "driving_codes"}
    with pytest.raises(ValueError, match="load_flame"):
        model.generator_step(no_codes)
    codes = batch["source_codes"]
    with pytest.raises(ValueError, match="flame_params.n_shape"):
        check_codes(codes.replace(shape=codes.shape[:, :10]), model.face_model, "codes")


# ----------------------------------------------------------------------------- inference
def test_without_an_encoder_checkpoint_every_image_gets_the_neutral_face(config, caplog):
    model = build_model(config)
    assert not bool(model.tdmm_fitted)
    with caplog.at_level(logging.WARNING, logger="modules.models.pwm"):
        state = model.encode_source(torch.rand(2, 3, SIZE, SIZE))
    assert "tdmm_params.checkpoint" in caplog.text
    codes = state["codes"]
    assert torch.all(codes.shape == 0) and torch.all(codes.exp == 0)
    assert torch.allclose(codes.cam, torch.tensor([[10.0, 0.0, 0.0]]))


def test_the_encoder_checkpoint_fits_codes_and_wins_over_the_stored_encoder(
        config, model, synthetic_root, tmp_path):
    tdmm = tdmm_checkpoint(tmp_path / "tdmm.pth", synthetic_root)
    assert not bool(model.tdmm_fitted)
    model_path = str(tmp_path / "pwm.pth")
    save_checkpoint_atomic(make_checkpoint(model, {}, {}, 0, 0, 0, config), model_path)
    named = load_config("tiny-pwm.yaml", tiny_overrides(synthetic_root) + [
        f"model_params.tdmm_params.checkpoint={tmp_path / 'tdmm.pth'}"])
    fitted = build_model(named, model_path)     # trained without an encoder, given one now
    assert bool(fitted.tdmm_fitted)
    torch.testing.assert_close(fitted.tdmm.head.weight, tdmm.encoder.head.weight)
    images = torch.rand(2, 3, SIZE, SIZE)
    torch.testing.assert_close(fitted.encode_driving(images)["codes"].exp,
                               tdmm.eval().encode_codes(images).exp)
    # a model checkpoint made with the encoder carries it: no tdmm file needed afterwards
    with_encoder = str(tmp_path / "pwm-with-encoder.pth")
    save_checkpoint_atomic(make_checkpoint(fitted, {}, {}, 0, 0, 0, named), with_encoder)
    os.remove(tmp_path / "tdmm.pth")
    restored = build_model(config, with_encoder)
    assert bool(restored.tdmm_fitted)
    torch.testing.assert_close(restored.tdmm.head.weight, tdmm.encoder.head.weight)
    with pytest.raises(FileNotFoundError, match="set it to null"):
        fitted.load_tdmm()                      # the named file is gone
    # a driving video's fitted codes are One-Euro smoothed in frame order by animate's driving
    # source, batch after batch, as the whole sequence at once would be
    video = build_dataset(config, is_train=False).videos[0]
    driving = DrivingVideo(video, (SIZE, SIZE))
    streamed = FaceCodes.cat([state["codes"] for state in driving.states(fitted, 4, "cpu")])
    raw = fitted.encode_driving(frames_to_batch(list(driving.reader), "cpu"))["codes"]
    expected = fitted.driving_smoother(driving.fps)({"codes": raw})["codes"]
    driving.close()
    # relative comparisons: this encoder's expression codes are tiny (~1e-10)
    torch.testing.assert_close(streamed.exp, expected.exp, rtol=1e-4, atol=0)
    torch.testing.assert_close(streamed.pose, expected.pose, rtol=1e-4, atol=0)
    assert not torch.allclose(streamed.exp, raw.exp, rtol=1e-2, atol=0)


def other_identity(codes, seed):
    generator = torch.Generator().manual_seed(seed)
    return codes.replace(shape=torch.randn(codes.shape.shape, generator=generator),
                         exp=codes.exp + 0.5 * torch.randn(codes.exp.shape, generator=generator))


@torch.no_grad()
def test_relative_codes_keep_the_source_identity(model, batch):
    model.eval()
    source = model.encode_source(batch["source"][:1])
    source["codes"] = batch["source_codes"][:1]
    driving = {"codes": other_identity(batch["driving_codes"], 1)}
    reference = {"codes": other_identity(batch["driving_codes"][:1], 2)}
    relative = model.relative_motion(expand_state({"codes": source["codes"]}, 2), driving,
                                     expand_state(reference, 2))["codes"]
    torch.testing.assert_close(relative.shape, source["codes"].shape.expand(2, -1))
    torch.testing.assert_close(relative.exp, source["codes"].exp + driving["codes"].exp
                               - reference["codes"].exp)
    # absolute transfer: the driver's own shape is replaced by the source's
    out = model.generate(source, driving)
    torch.testing.assert_close(out["codes_driving"].shape, source["codes"].shape.expand(2, -1))
    torch.testing.assert_close(out["codes_driving"].exp, driving["codes"].exp)
    out = model.generate(source, driving, reference, relative=True)
    torch.testing.assert_close(out["codes_driving"].shape, source["codes"].shape.expand(2, -1))


def landmark_asymmetry(model, codes):
    """Mean |left - mirrored right| of the projected eye corners and mouth corners about the nose
    bridge, in normalized image units: 0 for a frontal, symmetric face."""
    points = weak_perspective(model.face_model(codes).landmarks, codes.cam)
    pairs = [(36, 45), (39, 42), (48, 54)]
    centre = points[:, 27, 0]
    return float(sum(((points[:, a, 0] - centre) + (points[:, b, 0] - centre)).abs()
                     + (points[:, a, 1] - points[:, b, 1]).abs() for a, b in pairs).mean() / 3)


@torch.no_grad()
def test_edit_frontalizes_the_source(model, batch):
    model.eval()
    neutral = FaceCodes.zeros(1, scale=9.0)
    turned = edit_codes(neutral, FaceEdit(yaw=25.0, pitch=-10.0, roll=8.0, jaw_open=5.0))
    source = model.encode_source(batch["source"][:1])
    source["codes"] = turned
    driving = model.edit(source, [FRONTAL])
    frontal = driving["codes"]
    angles = angles_from_rotation(axis_angle_to_matrix(frontal.global_pose))
    assert max(abs(float(a)) for a in angles) < 1e-3
    torch.testing.assert_close(frontal.jaw_pose, turned.jaw_pose)   # only the head turned
    assert landmark_asymmetry(model, turned) > 0.05
    assert landmark_asymmetry(model, frontal) < 0.01
    prediction = model.generate(source, driving)["prediction"]
    assert prediction.shape == (1, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="batch 1"):
        model.edit({"codes": FaceCodes.cat([turned, turned])}, [FRONTAL])


def test_a_yaw_sweep_renders_one_frame_per_step(model, synthetic_root, tmp_path):
    model.eval()
    test_video = sorted(os.path.join(synthetic_root, "test", name)
                        for name in os.listdir(os.path.join(synthetic_root, "test"))
                        if "." not in name)[0]
    source = read_image(os.path.join(test_video, "0000000.png"), (SIZE, SIZE))
    sweep = EditSequence(sweep_edits("yaw", -30, 30, 5), fps=10)
    out = str(tmp_path / "sweep.mp4")
    info = animate(model, source, sweep, out, batch_size=2, progress=False)
    assert info["frames"] == 5
    reader = VideoReader(out, (SIZE, SIZE))
    frames = list(reader)
    reader.close()
    assert len(frames) == 5
    assert np.abs(frames[0].astype(float) - frames[-1].astype(float)).mean() > 0  # it moved


def test_driving_smoother_is_the_one_euro_filter_over_the_stream(model):
    torch.manual_seed(0)
    frames = 9
    codes = FaceCodes.zeros(frames)
    codes = codes.replace(exp=torch.cumsum(torch.randn(frames, 50) * 0.1, 0),
                          pose=torch.randn(frames, 6) * 0.05)
    smooth = model.driving_smoother(fps=25.0)
    chunks = [smooth({"codes": codes[start:start + 4]})["codes"] for start in range(0, frames, 4)]
    streamed = FaceCodes.cat(chunks)
    params = model.pwm_params["smoothing"]
    for name in ("exp", "pose", "cam"):
        expected = smooth_sequence(getattr(codes, name).numpy(), 25.0, params["min_cutoff"],
                                   params["beta"], params["d_cutoff"])
        np.testing.assert_allclose(getattr(streamed, name).numpy(), expected, rtol=1e-5,
                                   atol=1e-6)
    torch.testing.assert_close(streamed.shape, codes.shape)          # identity untouched
    assert not torch.allclose(streamed.exp, codes.exp)


# ----------------------------------------------------------------------------- command line
def cli_args(root, log_dir, mode, *extra):
    return ["--config", "tiny-pwm.yaml", "--mode", mode, "--log_dir", str(log_dir),
            "--device_ids", "cpu", *[f"--set={o}" for o in tiny_overrides(root)],
            "--set=train_params.max_steps=2", "--set=train_params.batch_size=2",
            "--set=reconstruction_params.num_videos=1", "--set=reconstruction_params.save_png=false",
            *extra]


def first_test_video(root):
    test = os.path.join(root, "test")
    return os.path.join(test, sorted(n for n in os.listdir(test) if "." not in n)[0])


def run_all_modes(run, root, tmp_path):
    """train 2 steps, reconstruct, animate a driving video, edit: each through run.py."""
    log_dir = tmp_path / "log"
    assert run(cli_args(root, log_dir, "train", "--run_name", "pwm")) == 0
    checkpoint = str(log_dir / "pwm" / "checkpoint_latest.pth")
    assert os.path.isfile(checkpoint)
    assert run(cli_args(root, log_dir, "reconstruction", "--checkpoint", checkpoint)) == 0
    assert os.path.isfile(log_dir / "pwm" / "reconstruction" / "metrics.json")
    video = first_test_video(root)
    source = os.path.join(video, "0000000.png")
    animated, edited = str(tmp_path / "animated.mp4"), str(tmp_path / "edited.mp4")
    assert run(cli_args(root, log_dir, "animate", "--checkpoint", checkpoint, "--source_image",
                        source, "--driving_video", video, "--result_video", animated)) == 0
    assert run(cli_args(root, log_dir, "animate", "--checkpoint", checkpoint, "--source_image",
                        source, "--edit", "pitch=0", "--edit_sweep", "yaw:-30:30:3",
                        "--result_video", edited)) == 0
    for path, frames in ((animated, len(os.listdir(video))), (edited, 3)):
        reader = VideoReader(path, (SIZE, SIZE))
        assert len(reader) == frames, path
        reader.close()


def test_command_line_in_process(synthetic_root, tmp_path):
    import run
    run_all_modes(run.main, synthetic_root, tmp_path)


@pytest.mark.slow
def test_command_line_in_subprocesses(synthetic_root, tmp_path):
    def run(args):
        return subprocess.run([sys.executable, os.path.join(REPO, "run.py"), *args], cwd=tmp_path,
                              env=dict(os.environ, PYTHONPATH=REPO)).returncode
    run_all_modes(run, synthetic_root, tmp_path)
