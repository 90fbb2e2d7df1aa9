"""The objectives models hold (modules/objectives.py): perceptual pyramid, adversarial, equivariance."""
import os

import pytest
import torch

from modules.discriminator import MultiScaleDiscriminator
from modules.keypoint_detector import KPDetector
from modules.objectives import (OBJECTIVE_TRAIN_PARAMS, AdversarialObjective,
                                EquivarianceObjective, PerceptualPyramid, feature_matching_loss,
                                gan_discriminator_loss, gan_generator_loss, shared_vgg19,
                                vgg19_feature_layers, vgg19_hub_path)
from modules.util import RandomTransform

from config import deep_update


def train_params(**changes):
    return deep_update(OBJECTIVE_TRAIN_PARAMS, changes)


# ----------------------------------------------------------------------------- equivariance
def test_identity_transform_gives_zero_equivariance_losses():
    detector = KPDetector(4, 3, 8, 32, 2, scale_factor=0.25).eval()
    frames = torch.rand(2, 3, 64, 64)
    objective = EquivarianceObjective({"sigma_affine": 0.0, "sigma_tps": 0.0}, 10.0, 10.0)
    identity = RandomTransform(2, sigma_affine=0.0, sigma_tps=0.0, align_corners=True)
    losses = objective(detector, frames, detector(frames), transform=identity)
    assert set(losses) == {"equivariance_value", "equivariance_jacobian"}
    assert all(value < 1e-4 for value in losses.values())
    moved = RandomTransform(2, sigma_affine=0.3, sigma_tps=0.0,
                            generator=torch.Generator().manual_seed(0))
    assert objective(detector, frames, detector(frames), transform=moved)[
        "equivariance_value"] > 1e-3


def test_equivariance_off_when_weights_are_zero():
    params = train_params(loss_weights={"equivariance_value": 0, "equivariance_jacobian": 0})
    assert EquivarianceObjective.from_config(params) is None


# ----------------------------------------------------------------------------- GAN
def test_gan_losses_lsgan_and_hinge():
    perfect_real = {1.0: {"prediction": torch.ones(2, 1, 4, 4), "features": [torch.ones(2, 3)]}}
    perfect_fake = {1.0: {"prediction": torch.zeros(2, 1, 4, 4), "features": [torch.zeros(2, 3)]}}
    assert gan_discriminator_loss(perfect_real, perfect_fake) == 0
    assert gan_generator_loss(perfect_fake) == 1
    assert feature_matching_loss(perfect_real, perfect_fake, [10.0]) == 10
    assert feature_matching_loss(perfect_real, perfect_real, [10.0]) == 0
    # hinge: D(real) >= 1 and D(fake) <= -1 cost the discriminator nothing
    real = {1.0: {"prediction": torch.full((2, 1, 4, 4), 1.5)}}
    fake = {1.0: {"prediction": torch.full((2, 1, 4, 4), -2.0)}}
    assert gan_discriminator_loss(real, fake, "hinge") == 0
    assert gan_discriminator_loss(fake, real, "hinge") == pytest.approx(3.0 + 2.5)
    assert gan_generator_loss(fake, "hinge") == pytest.approx(2.0)


def test_adversarial_objective_owns_the_discriminator_and_its_gradients():
    discriminator = MultiScaleDiscriminator(scales=[1.0], block_expansion=4, max_features=16,
                                            num_blocks=2, use_kp=True, num_kp=3)
    objective = AdversarialObjective(discriminator, train_params(
        gan_loss="hinge", loss_weights={"generator_gan": 2.0, "feature_matching": [10, 10]}))
    assert objective.enabled and set(dict(objective.named_parameters())) == {
        "discriminator." + name for name, _ in discriminator.named_parameters()}
    fake = torch.rand(2, 3, 32, 32, requires_grad=True)
    kp = {"value": torch.rand(2, 3, 2, requires_grad=True)}
    losses = objective.generator_losses(fake, torch.rand(2, 3, 32, 32), kp)
    assert set(losses) == {"generator_gan", "feature_matching"}
    sum(losses.values()).backward()
    assert fake.grad.abs().sum() > 0 and kp["value"].grad is None       # keypoints detached
    d_losses = objective.discriminator_losses(torch.rand(2, 3, 32, 32), fake, kp)
    fake.grad = None
    sum(d_losses.values()).backward()
    assert fake.grad is None                                            # the fake is detached
    off = AdversarialObjective(discriminator, train_params())           # generator_gan 0
    assert not off.enabled and off.generator_losses(fake, fake) == {}
    with pytest.raises(ValueError, match="gan_loss"):
        AdversarialObjective(discriminator, train_params(gan_loss="wgan"))


# ----------------------------------------------------------------------------- perceptual
@pytest.fixture
def empty_hub(tmp_path):
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(previous)


def test_vgg_missing_weights_names_the_path(empty_hub):
    expected = os.path.join(str(empty_hub), "checkpoints", "vgg19-dcbb9e9d.pth")
    assert vgg19_hub_path() == expected
    loss = PerceptualPyramid.from_config(train_params(perceptual_pretrained=True, scales=[1.0]))
    image = torch.rand(1, 3, 32, 32)
    with pytest.raises(FileNotFoundError) as error:   # the file is needed at the first use
        loss(image, image)
    message = str(error.value)
    assert expected in message
    assert "download.pytorch.org/models/vgg19-dcbb9e9d.pth" in message
    assert "perceptual_pretrained" in message


def test_vgg_weights_load_from_hub_cache_and_config_path(empty_hub, tmp_path):
    layers = vgg19_feature_layers()
    custom = tmp_path / "my_vgg.pth"
    torch.save({f"features.{k}": v for k, v in layers.state_dict().items()}, custom)
    from_path = shared_vgg19(str(custom), True, "cpu", torch.float32)
    assert torch.equal(from_path.slices[4][-2].weight, layers[28].weight)
    os.makedirs(empty_hub / "checkpoints")
    os.symlink(custom, vgg19_hub_path())
    from_hub = shared_vgg19(None, True, "cpu", torch.float32)
    assert torch.equal(from_hub.slices[0][0].weight, layers[0].weight)


def test_perceptual_random_vgg_is_shared_frozen_and_kept_out_of_modules():
    params = train_params(perceptual_pretrained=False, scales=[1.0, 0.5])
    loss, other = PerceptualPyramid.from_config(params), PerceptualPyramid.from_config(params)
    image = torch.rand(1, 3, 32, 32)
    assert loss(image, image) == 0
    assert loss.vgg(image) is other.vgg(image)                  # built once per process
    assert not any(p.requires_grad for p in loss.vgg(image).parameters())
    assert not isinstance(loss, torch.nn.Module)                # never in a state dict
    prediction = torch.rand(1, 3, 32, 32, requires_grad=True)
    value = loss(prediction, image)
    value.backward()
    assert value > 0 and prediction.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="relu5_1"):
        PerceptualPyramid([0.25], [1.0] * 5, imagenet=False)(image, image)
    assert PerceptualPyramid.from_config(train_params(loss_weights={"perceptual": [0] * 5})) \
        is None
