"""MMFA (seed 004): the keypoint decomposition x = s R x_c + t + delta, its losses, the rotation
sources, motion transfer and editing, and the expression VAE with its interpolation.

Tiny networks (configs/tiny-mmfa.yaml, tiny-mmfa-vae.yaml) on random or synthetic frames; checked
against hand computations (rotations, scales, KL of a Gaussian) and scipy's rotations.
"""
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from config import ConfigError
from modules.editing import IMAGE_AXES, FaceEdit, angles_from_rotation, change_frame
from modules.expression_vae import ExpressionVAE, interpolate_features, kl_divergence
from modules.head_rotation import TDMMRotation
from modules.mmfa_losses import (LANDMARK_PARTS, LandmarkObjective, MultiScalePerceptual,
                                 landmark_weights, random_similarity, representation_loss)
from modules.multiscale_generator import MultiScaleDecoder
from modules.objectives import PerceptualPyramid
from modules.registry import build_model, load_config
from modules.util import ImagePyramid

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def config():
    return load_config("tiny-mmfa.yaml")


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    return build_model(config).eval()


@pytest.fixture(scope="module")
def frames():
    generator = torch.Generator().manual_seed(3)
    coarse = torch.rand(4, 3, 8, 8, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear",
                                             align_corners=False)
    return (0.7 * smooth + 0.3 * torch.rand(4, 3, 64, 64, generator=generator)).clamp(0, 1)


def without_motion(model, source, driving):
    """x - t - delta of the driving keypoints (what s R x_c should be)."""
    kp = model.driving_keypoints(source, driving)["value"]
    deltas = model.deformations(driving, source["kp_canonical"])
    return kp - driving["translation"][:, None] - deltas


# ----------------------------------------------------------------------------- keypoints
@torch.no_grad()
def test_rotating_the_driving_pose_rotates_the_keypoints_by_it(model, frames):
    source = model.encode_source(frames[:2])
    driving = model.encode_driving(frames[2:])
    known = torch.as_tensor(Rotation.from_euler("xyz", [[10, -25, 5], [-30, 15, 40]],
                                                degrees=True).as_matrix(), dtype=torch.float32)
    turned = dict(driving, rotation=known @ driving["rotation"])
    before = without_motion(model, source, driving)
    after = without_motion(model, source, turned)
    torch.testing.assert_close(after, torch.einsum("bij,bkj->bki", known, before), atol=1e-5,
                               rtol=0)
    assert (after - before).abs().max() > 1e-2            # the keypoints did move


@torch.no_grad()
def test_scale_two_doubles_the_keypoint_spread_about_the_translation(model, frames):
    source = model.encode_source(frames[:2])
    driving = model.encode_driving(frames[2:])
    unit = dict(driving, scale=torch.ones_like(driving["scale"]))
    double = dict(driving, scale=2 * torch.ones_like(driving["scale"]))
    torch.testing.assert_close(without_motion(model, source, double),
                               2 * without_motion(model, source, unit), atol=1e-6, rtol=0)
    spread = lambda state: model.driving_keypoints(source, state)["value"].std(dim=1)  # noqa
    assert torch.all(spread(double) > spread(unit))


@torch.no_grad()
def test_expression_deformations_depend_on_the_identity(model, frames):
    """delta = D_exp(epsilon, x_c): the same expression feature on another face's canonical
    keypoints gives other deformations."""
    feature = model.encode_expression(frames[:1]).expand(2, -1)
    canonical = {"value": torch.rand(2, 10, 3, generator=torch.Generator().manual_seed(0)) - 0.5}
    deltas = model.deformations({"expression": feature}, canonical)
    assert deltas.shape == (2, 10, 3)
    assert (deltas[0] - deltas[1]).abs().max() > 1e-3


@torch.no_grad()
def test_tdmm_rotation_turns_flame_pose_into_the_keypoint_frame():
    """R of the 3DMM encoder's axis-angle pose, moved from the camera frame (y up, z towards the
    camera) into the keypoint frame (y down, z away): scipy's rotation conjugated by the flip."""
    rotation = TDMMRotation(n_shape=4, n_exp=3, n_pose=6)
    axis_angle = torch.tensor([0.2, -0.5, 0.1])
    with torch.no_grad():
        rotation.network.head.bias[4 + 3:4 + 3 + 3] = axis_angle    # pose follows shape, exp
    result = rotation(torch.rand(2, 3, 64, 64))
    flip = np.diag(IMAGE_AXES)
    expected = flip @ Rotation.from_rotvec(axis_angle.numpy()).as_matrix() @ flip
    np.testing.assert_allclose(result.numpy(), np.stack([expected] * 2), atol=1e-6)
    assert not rotation.train().training                                  # frozen


def test_rotation_weights_load_once_from_a_tdmm_checkpoint(config, tmp_path):
    """prepare_training loads the pretrained rotation network; a restored model keeps the weights
    it was saved with and does not need the file."""
    from mmfa_helpers import save_model
    torch.manual_seed(1)
    tdmm = build_model(load_config("tiny-pretrain-3dmm.yaml",
                                   ["model_params.tdmm_params.imagenet_init=false"]))
    with torch.no_grad():
        tdmm.encoder.head.bias.normal_()
    path = save_model(tdmm, tdmm.config, tmp_path / "tdmm.pth")
    overrides = [f"model_params.rotation_params.checkpoint={path}",
                 "model_params.rotation_params.pretrained=true"]
    mmfa = build_model(load_config("tiny-mmfa.yaml", overrides))
    assert not bool(mmfa.rotation.loaded)
    mmfa.prepare_training(None)
    assert bool(mmfa.rotation.loaded)
    torch.testing.assert_close(mmfa.rotation.network.head.bias, tdmm.encoder.head.bias)
    restored = build_model(mmfa.config, {"model": "mmfa", "model_params": mmfa.config[
        "model_params"], "state_dict": mmfa.state_dict()})
    (tmp_path / "tdmm.pth").unlink()
    restored.prepare_training(None)                                # no file needed any more
    torch.testing.assert_close(restored.rotation.network.head.bias, tdmm.encoder.head.bias)


def test_missing_pretrained_parts_are_named_in_the_config_check():
    with pytest.raises(ConfigError, match="pretrain-3dmm.yaml"):
        load_config("tiny-mmfa.yaml", ["model_params.rotation_params.pretrained=true"])
    with pytest.raises(ConfigError, match="Hopenet state-dict file"):
        load_config("tiny-mmfa.yaml", ["model_params.rotation_params.pretrained=true",
                                       "model_params.rotation_params.source=hopenet"])
    with pytest.raises(ConfigError, match="landmark_params.checkpoint"):
        load_config("tiny-mmfa.yaml", ["model_params.landmark_params.pretrained=true"])
    load_config("tiny-mmfa.yaml", ["model_params.landmark_params.pretrained=true",
                                   "train_params.loss_weights.landmark=0"])


# ----------------------------------------------------------------------------- losses
def test_expression_features_become_invariant_to_the_augmentation_in_a_short_overfit(config,
                                                                                     frames):
    """The representation loss (eq. 7) trains epsilon(D) and epsilon(D_aug) together: their
    cosine similarity on a held-out augmentation rises over a few steps."""
    torch.manual_seed(0)
    model = build_model(config, training=True)
    optimizer = torch.optim.Adam(model.expression_encoder.parameters(), lr=1e-3)
    images = frames
    held_out = random_similarity(4, generator=torch.Generator().manual_seed(99))

    def similarity():
        with torch.no_grad():
            return torch.cosine_similarity(model.encode_expression(images),
                                           model.encode_expression(
                                               held_out.transform_image(images))).mean().item()

    before = similarity()
    for step in range(15):
        augmented = random_similarity(4, generator=torch.Generator().manual_seed(step))
        loss = representation_loss(model.encode_expression(images),
                                   model.encode_expression(augmented.transform_image(images)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = similarity()
    assert after > before + 0.05, (before, after)


def test_random_similarity_is_a_rotation_scale_and_shift():
    transform = random_similarity(64, max_rotation=20, scale_range=(0.9, 1.1),
                                  max_translation=0.05, generator=torch.Generator().manual_seed(0))
    linear = transform.affine[:, :, :2]
    scale = torch.sqrt(torch.linalg.det(linear))
    rotation = linear / scale[:, None, None]
    torch.testing.assert_close(rotation @ rotation.transpose(1, 2), torch.eye(2).expand(64, 2, 2),
                               atol=1e-6, rtol=0)                  # no shear
    angles = torch.rad2deg(torch.atan2(rotation[:, 1, 0], rotation[:, 0, 0]))
    assert angles.abs().max() <= 20 and scale.min() >= 0.9 and scale.max() <= 1.1
    assert transform.affine[:, :, 2].abs().max() <= 0.05 and transform.control_points is None


def test_landmark_loss_weights_parts_and_trains_only_the_generated_frame():
    weights = landmark_weights({"contour": 1.0, "eyes": 2.0, "mouth": 0.0})
    assert weights[LANDMARK_PARTS["eyes"][0]] == 2 and weights[60] == 0 and weights[30] == 1
    assert weights[72] == 2 and weights[73] == 2                      # the pupils are eyes
    objective = LandmarkObjective({"num_landmarks": 74, "features": 16, "num_stacks": 1,
                                   "depth": 2}, {"contour": 1.0, "eyes": 1.0, "mouth": 1.0},
                                  pretrained=False)
    driving = torch.rand(2, 3, 32, 32)
    assert objective(driving.clone(), driving).item() == 0
    generated = torch.rand(2, 3, 32, 32, requires_grad=True)
    loss = objective(generated, driving)
    loss.backward()
    assert loss.item() > 0 and generated.grad.abs().sum() > 0
    assert all(p.grad is None for p in objective.detector(generated).parameters())
    with pytest.raises(ValueError, match="landmark_params.checkpoint"):
        LandmarkObjective({"num_landmarks": 74, "features": 16, "num_stacks": 1, "depth": 2},
                          {}, pretrained=True).detector(generated)


def test_multiscale_decoder_and_its_perceptual_loss_at_every_output_size():
    decoder = MultiScaleDecoder(16, num_levels=3)
    images = decoder(torch.rand(2, 16, 16, 16))
    assert [tuple(image.shape[-2:]) for image in images] == [(16, 16), (32, 32), (64, 64)]
    train_params = {"scales": [1.0, 0.5], "perceptual_weights_path": None,
                    "perceptual_pretrained": False,
                    "loss_weights": {"perceptual": [1.0, 1.0, 1.0, 1.0, 1.0]}}
    loss = MultiScalePerceptual(train_params, 64, [16, 32, 64])
    target = torch.rand(2, 3, 64, 64)
    by_hand = 0
    for image, scales in zip(images, ([1.0], [1.0, 0.5], [1.0, 0.5])):   # >= 16 px for VGG
        shrunk = ImagePyramid([image.shape[-1] / 64])(target)
        by_hand = by_hand + PerceptualPyramid(scales, [1.0] * 5, imagenet=False)(
            image, next(iter(shrunk.values())))
    torch.testing.assert_close(loss(images, target), by_hand)


# ----------------------------------------------------------------------------- inference
@torch.no_grad()
def test_pose_only_and_expression_only_transfer(model, frames):
    source = model.encode_source(frames[:1])
    driving = model.encode_driving(frames[1:3])
    from modules.model_base import expand_state
    source = expand_state(source, 2)
    pose = model.driving_keypoints(source, dict(driving, transfer="pose"))["value"]
    expected = model.motion_keypoints(source["kp_canonical"],
                                      dict(driving, expression=source["expression"]))["value"]
    torch.testing.assert_close(pose, expected)
    expression = model.driving_keypoints(source, dict(driving, transfer="expression"))["value"]
    expected = model.motion_keypoints(source["kp_canonical"], dict(
        source, expression=driving["expression"]))["value"]
    torch.testing.assert_close(expression, expected)
    with pytest.raises(ValueError, match="unknown motion transfer"):
        model.driving_keypoints(source, dict(driving, transfer="gaze"))


@torch.no_grad()
def test_relative_motion_composes_the_parameters(model, frames):
    """With the source as the reference, relative motion is the driving motion itself; in
    general R = R_D R_ref^T R_S and s = s_S s_D / s_ref."""
    source = model.encode_source(frames[:1])
    driving = model.encode_driving(frames[1:2])
    reference = model.encode_driving(frames[2:3])
    itself = model.relative_motion(source, driving, model.encode_driving(frames[:1]))
    for key in ("rotation", "translation", "scale", "expression"):
        torch.testing.assert_close(itself[key], driving[key], atol=1e-5, rtol=1e-5)
    moved = model.relative_motion(source, driving, reference)
    delta = driving["rotation"] @ reference["rotation"].transpose(1, 2)
    torch.testing.assert_close(moved["rotation"], delta @ source["rotation"])
    torch.testing.assert_close(moved["scale"],
                               source["scale"] * driving["scale"] / reference["scale"])


@torch.no_grad()
def test_edit_frontalizes_turns_and_scales_the_source(model, frames):
    """edit() is modules.editing's keypoint-pose edit: yaw=pitch=roll=0 gives the frontal head;
    a yaw offset turns it about the camera's y axis; scale and expression entries change."""
    source = model.encode_source(frames[:1])
    source["rotation"] = change_frame(torch.as_tensor(
        Rotation.from_euler("xyz", [[-10, 20, 5]], degrees=True).as_matrix(),
        dtype=torch.float32), IMAGE_AXES)
    edits = [FaceEdit(yaw=0.0, pitch=0.0, roll=0.0), FaceEdit(yaw_offset=15.0),
             FaceEdit(scale_factor=2.0, expression={0: 3.0})]
    states = model.edit(source, edits)
    torch.testing.assert_close(states["rotation"][0], torch.eye(3), atol=1e-5, rtol=0)
    yaw = angles_from_rotation(change_frame(states["rotation"][1:2], IMAGE_AXES))[0]
    assert yaw.item() == pytest.approx(35.0, abs=1e-3)
    assert states["scale"][2] == pytest.approx(2 * source["scale"][0].item())
    assert states["expression"][2, 0] == 3.0
    frames_out = model.transfer({k: v.expand(3, *v.shape[1:]) if torch.is_tensor(v) else
                                 {kk: vv.expand(3, *vv.shape[1:]) for kk, vv in v.items()}
                                 for k, v in source.items()}, states)["prediction"]
    assert frames_out.shape == (3, 3, 64, 64)


# ----------------------------------------------------------------------------- VAE
def test_kl_term_is_zero_at_the_prior_and_matches_torch_distributions():
    mu, logvar = torch.zeros(3, 8), torch.zeros(3, 8)
    assert kl_divergence(mu, logvar).item() == 0
    mu, logvar = torch.randn(3, 8), torch.randn(3, 8)
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(posterior, prior).sum(1).mean()
    torch.testing.assert_close(kl_divergence(mu, logvar), expected)


def test_interpolation_reproduces_the_endpoints_and_follows_the_latent_line():
    torch.manual_seed(0)
    vae = ExpressionVAE(feature_dim=16, latent_dim=4, hidden=(32,)).eval()
    a, b = torch.randn(1, 16), torch.randn(1, 16)
    with torch.no_grad():
        path = interpolate_features(vae, a, b, [0.0, 0.5, 1.0])
        torch.testing.assert_close(path[0], a[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(path[2], b[0], atol=1e-6, rtol=0)
        middle = vae.decode(0.5 * (vae.encode(a)[0] + vae.encode(b)[0]))
        residual = 0.5 * (a - vae.decode(vae.encode(a)[0]) + b - vae.decode(vae.encode(b)[0]))
        torch.testing.assert_close(path[1], (middle + residual)[0])
    assert vae.train()(a)["z"].shape == (1, 4)


def test_vae_model_trains_on_the_mmfa_encoder_it_checks(config, tmp_path):
    """mmfa_vae loads the expression encoder of an mmfa checkpoint (refusing mismatched
    settings), keeps it frozen, and refuses another MMFA model's encoder at inference."""
    from mmfa_helpers import mmfa_checkpoint, vae_config
    _, path = mmfa_checkpoint(tmp_path, seed=2)
    mmfa = build_model(config, path)
    vae = build_model(vae_config(path), training=True)
    vae.prepare_training(None)
    vae.check_encoder(mmfa.expression_encoder)
    losses, generated = vae.generator_step({"source": torch.rand(2, 3, 64, 64),
                                            "driving": torch.rand(2, 3, 64, 64)})
    assert set(losses) == {"kl", "reconstruction", "generator_gan"}
    sum(losses.values()).backward()
    assert all(p.grad is None for p in vae.expression_encoder.parameters())
    assert not vae.expression_encoder.training
    torch.manual_seed(3)
    with pytest.raises(ValueError, match="another MMFA model"):
        vae.check_encoder(build_model(config).expression_encoder)
    wrong = vae_config(path, ["model_params.expression_params.feature_dim=16"])
    with pytest.raises(ValueError, match="expression_params.feature_dim"):
        build_model(wrong).prepare_training(None)
    with torch.no_grad():
        features = vae.eval().interpolate(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64),
                                          np.linspace(0, 1, 5))
    assert features.shape == (5, 32) and math.isfinite(features.sum().item())
