"""The facevid2vid model against the public re-implementation's golden training forward.

The tiny golden networks (tests/data/golden/facevid2vid/weights.pt, plus the full-size head-pose
estimator from its weight recipe) go through the checkpoint converter (compat/checkpoints.py)
into our ``facevid2vid`` model; its ``generator_step`` and ``discriminator_step``, run in float64
with the recorded equivariance transform replayed, must give the golden float64 losses to rtol
1e-9 (the float32 golden carries about 1e-3 relative noise from the 2048-channel estimator).
"""

import pytest
import torch

from compat.checkpoints import convert_checkpoint, detect_reference
from compat.facevid2vid import model_params_from_reference
from config import validate
from facevid2vid_golden import (HE_ESTIMATOR_SEED, full_hopenet, load_golden, recipe_state,
                                tiny_model_params)
from modules.registry import build_model, model_schema
from modules.util import RandomTransform

# the golden tiny config's loss weights, by our names (the reference's in comments)
GOLDEN_TRAIN_PARAMS = {
    "gan_loss": "hinge",
    "hopenet_snapshot": "given-in-memory",
    "scales": [1.0, 0.5, 0.25, 0.125],
    "transform_params": {"sigma_affine": 0.05, "sigma_tps": 0.005, "points_tps": 5},
    "loss_weights": {"generator_gan": 1, "discriminator_gan": 1,
                     "feature_matching": [10, 10, 10, 10], "perceptual": [0, 0, 0, 0, 0],
                     "equivariance_value": 10, "equivariance_jacobian": 0,
                     "keypoint_prior": 10,            # keypoint
                     "head_pose": 20,                 # headpose
                     "deformation_prior": 5},         # expression
}
LOSS_NAMES = {"generator_gan": "gen_gan", "feature_matching": "feature_matching",
              "equivariance_value": "equivariance_value", "keypoint_prior": "keypoint",
              "head_pose": "headpose", "deformation_prior": "expression"}


def reference_checkpoint():
    """The golden networks as a reference checkpoint dict (what Logger.save_cpk writes)."""
    weights = load_golden("weights")
    he_estimator = {**recipe_state("he_estimator", HE_ESTIMATOR_SEED),
                    **weights["he_estimator_buffers"]}
    return {"kp_detector": weights["kp_detector"], "generator": weights["generator"],
            "discriminator": weights["discriminator"], "he_estimator": he_estimator, "epoch": 0}


def golden_model(dtype):
    model_params = model_params_from_reference(tiny_model_params())
    config = validate({"model": "facevid2vid", "model_params": model_params,
                       "train_params": GOLDEN_TRAIN_PARAMS}, model_schema, model_check=False)
    reference = reference_checkpoint()
    assert detect_reference(reference) == "facevid2vid"
    model = build_model(config, convert_checkpoint(reference, config["model_params"]),
                        training=True)
    model.use_hopenet(full_hopenet())                     # the recipe's loss network
    return model.to(dtype)


def replay_transform(model, dtype):
    recorded = load_golden("losses")["transform"]
    replay = RandomTransform.from_parameters(recorded["theta"].to(dtype),
                                             recorded["control_points"].to(dtype),
                                             recorded["control_params"].to(dtype))
    model.equivariance_transform = lambda driving: replay


@pytest.fixture(scope="module")
def float64_forward():
    torch.set_num_threads(1)
    model = golden_model(torch.float64)
    replay_transform(model, torch.float64)
    inputs = load_golden("io")["inputs"]
    batch = {"source": inputs["source"].double(), "driving": inputs["driving"].double()}
    losses, generated = model.generator_step(batch)
    discriminator_losses = model.discriminator_step(batch, generated)
    return losses, generated, discriminator_losses


def test_generator_losses_match_golden_float64(float64_forward):
    losses, _, _ = float64_forward
    golden = load_golden("losses")["float64"]["generator_losses"]
    assert set(losses) == set(LOSS_NAMES)
    for ours, theirs in LOSS_NAMES.items():
        assert losses[ours].item() == pytest.approx(golden[theirs].item(), rel=1e-9), ours


def test_discriminator_loss_matches_golden_float64(float64_forward):
    _, _, losses = float64_forward
    golden = load_golden("losses")["float64"]["discriminator_losses"]["disc_gan"]
    assert losses["discriminator_gan"].item() == pytest.approx(golden.item(), rel=1e-9)


def test_keypoints_and_prediction_match_golden_float64(float64_forward):
    _, generated, _ = float64_forward
    golden = load_golden("losses")["float64"]
    for name in ("kp_source", "kp_driving", "transformed_kp"):
        torch.testing.assert_close(generated[name]["value"], golden[name], atol=1e-9, rtol=0)
    assert generated["prediction"].mean().item() == pytest.approx(
        golden["prediction_mean"].item(), rel=1e-9)


# ----------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def tiny_model():
    from modules.registry import load_config
    torch.manual_seed(0)
    return build_model(load_config("tiny-facevid2vid.yaml")).eval()


@torch.no_grad()
def test_relative_animation_is_the_reference_demos_normalize_kp(tiny_model):
    """Relative keypoints = source keypoints + driving - reference keypoints, both with the
    source's canonical keypoints (the reference demo)."""
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    source = tiny_model.encode_source(images[:1])
    driving, reference = tiny_model.encode_driving(images[1:2]), \
        tiny_model.encode_driving(images[2:3])
    moved = tiny_model.relative_motion(source, driving, reference)["kp"]["value"]
    kp = lambda motion: tiny_model.motion_keypoints(source["kp_canonical"], motion)["value"]  # noqa
    torch.testing.assert_close(moved, source["kp"]["value"] + kp(driving) - kp(reference))


@torch.no_grad()
def test_facevid2vid_edits_and_partial_transfer(tiny_model):
    """The shared editing interface on face-vid2vid's pose (s = 1, per-keypoint deltas), and
    pose-only transfer keeping the source's deltas."""
    from modules.editing import FaceEdit
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    source = tiny_model.encode_source(images[:1])
    states = tiny_model.edit(source, [FaceEdit(yaw=0.0, pitch=0.0, roll=0.0),
                                      FaceEdit(expression_offset={4: 0.5})])
    torch.testing.assert_close(states["rotation"][0], torch.eye(3), atol=1e-5, rtol=0)
    assert states["expression"].shape == (2, 10, 3)
    delta = states["expression"][1] - source["expression"][0]
    assert delta.flatten()[4] == pytest.approx(0.5) and delta.abs().sum() == pytest.approx(0.5)
    driving = tiny_model.encode_driving(images[1:])
    pose_only = tiny_model.driving_keypoints(source, dict(driving, transfer="pose"))["value"]
    expected = tiny_model.motion_keypoints(source["kp_canonical"], dict(
        driving, expression=source["expression"]))["value"]
    torch.testing.assert_close(pose_only, expected)


def test_head_pose_loss_without_a_hopenet_file_is_a_clear_error(tmp_path):
    from modules.registry import load_config
    config = load_config("tiny-facevid2vid.yaml", ["train_params.loss_weights.head_pose=20"])
    model = build_model(config, training=True)                # inference needs no Hopenet
    batch = {"source": torch.rand(2, 3, 64, 64), "driving": torch.rand(2, 3, 64, 64)}
    with pytest.raises(ValueError, match="hopenet_snapshot names no file"):
        model.generator_step(batch)
    model.hopenet_snapshot = str(tmp_path / "hopenet_robust_alpha1.pkl")
    with pytest.raises(FileNotFoundError, match="hopenet_robust_alpha1.pkl"):
        model.generator_step(batch)
