"""Training losses shared by the models: VGG-19 perceptual pyramid, LSGAN, feature matching and
FOMM's equivariance constraints (SAFA appendix A, eqs. 15-17 and 19).

VGG-19 weights are never downloaded. They are torchvision's ImageNet file
(``torchvision.models.VGG19_Weights.IMAGENET1K_V1``), looked up at an explicit path from the
config or in the torch hub cache where torchvision itself would keep it
(``<torch.hub.get_dir()>/checkpoints/vgg19-dcbb9e9d.pth``). Without the file the loss refuses to
start unless the config explicitly allows random initialization (tiny test configs).
"""
import os

import torch
import torchvision
from torch import nn

from modules.util import ImagePyramid

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # torchvision's ImageNet normalization
IMAGENET_STD = (0.229, 0.224, 0.225)
# Indices into torchvision's vgg19().features after which relu1_1 .. relu5_1 are taken.
VGG19_SLICE_ENDS = (2, 7, 12, 21, 30)
VGG19_MIN_SIZE = 16   # smallest input side that still reaches relu5_1 (after 4 max pools)


# ----------------------------------------------------------------------------- VGG-19
def vgg19_weights_entry():
    return torchvision.models.VGG19_Weights.IMAGENET1K_V1


def vgg19_hub_path():
    """Where torchvision keeps the ImageNet VGG-19 file in the torch hub cache."""
    file_name = os.path.basename(vgg19_weights_entry().url)
    return os.path.join(torch.hub.get_dir(), "checkpoints", file_name)


def missing_vgg19_message(path):
    url = vgg19_weights_entry().url
    return (f"VGG-19 ImageNet weights for the perceptual loss not found at {path}. Nothing is "
            f"downloaded at run time: on a machine with internet, run\n"
            f"    python -c \"import torchvision; torchvision.models.vgg19("
            f"weights='IMAGENET1K_V1')\"\n"
            f"(or fetch {url}) and copy the file to {path}, or set "
            f"train_params.perceptual_weights_path to its location. For tests and smoke runs only, "
            f"set train_params.perceptual_pretrained: false to use a randomly initialized VGG-19.")


def vgg19_feature_layers():
    """``torchvision.models.vgg19().features`` without building the 140M-parameter classifier."""
    vgg = torchvision.models.vgg
    if hasattr(vgg, "make_layers") and hasattr(vgg, "cfgs"):
        return vgg.make_layers(vgg.cfgs["E"], batch_norm=False)
    return torchvision.models.vgg19(weights=None).features


def load_vgg19_features(weights_path=None, imagenet=True):
    """VGG-19 conv layers with ImageNet weights from ``weights_path`` or the torch hub cache.

    ``imagenet=False`` keeps torchvision's random initialization (no file needed).
    Raises ``FileNotFoundError`` naming the expected path when the weights are missing.
    """
    if not imagenet:
        # A fixed random network (its own seed, the global RNG untouched), so the loss is the same
        # function in every run and a resumed run continues exactly.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return vgg19_feature_layers()
    layers = vgg19_feature_layers()
    path = weights_path or vgg19_hub_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_vgg19_message(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    prefix = "features."
    feature_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    layers.load_state_dict(feature_state or state)
    return layers


class Vgg19Features(nn.Module):
    """Frozen VGG-19 returning relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 of an image in [0, 1]."""

    def __init__(self, weights_path=None, imagenet=True):
        super().__init__()
        layers = load_vgg19_features(weights_path, imagenet)
        starts = (0,) + VGG19_SLICE_ENDS[:-1]
        self.slices = nn.ModuleList(nn.Sequential(*layers[start:end])
                                    for start, end in zip(starts, VGG19_SLICE_ENDS))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)   # frozen: never leaves eval mode

    def forward(self, image):
        out = (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)
        features = []
        for block in self.slices:
            out = block(out)
            features.append(out)
        return features


class PerceptualPyramidLoss(nn.Module):
    """Eq. 15: sum over pyramid scales and VGG layers of ``layer_weight * mean |f(D) - f(D_rec)|``.

    The layer weights (one per relu slice) are part of the loss; scales as in FOMM
    ``[1, 0.5, 0.25, 0.125]``. The target's features carry no gradient.
    """

    def __init__(self, scales, layer_weights, weights_path=None, imagenet=True):
        super().__init__()
        if len(layer_weights) != len(VGG19_SLICE_ENDS):
            raise ValueError(f"perceptual loss weights need one value per VGG-19 slice "
                             f"({len(VGG19_SLICE_ENDS)}), got {list(layer_weights)}")
        self.layer_weights = [float(w) for w in layer_weights]
        self.pyramid = ImagePyramid(scales)
        self.vgg = Vgg19Features(weights_path, imagenet)

    def forward(self, prediction, target):
        predicted, real = self.pyramid(prediction), self.pyramid(target)
        self.check_sizes(predicted)
        total = prediction.new_zeros(())
        for scale in self.pyramid.scales:
            predicted_features = self.vgg(predicted[scale])
            with torch.no_grad():
                real_features = self.vgg(real[scale])
            for weight, fake, true in zip(self.layer_weights, predicted_features, real_features):
                if weight:
                    total = total + weight * (fake - true).abs().mean()
        return total

    @staticmethod
    def check_sizes(pyramid):
        """VGG-19 pools 4 times before relu5_1: every pyramid level needs at least 16 pixels."""
        for scale, image in pyramid.items():
            if min(image.shape[-2:]) < VGG19_MIN_SIZE:
                raise ValueError(
                    f"perceptual loss scale {scale} turns {tuple(image.shape[-2:])} images into "
                    f"fewer than {VGG19_MIN_SIZE} pixels, too small for VGG-19's relu5_1; remove "
                    f"that scale from train_params.scales or use larger frames")


def build_perceptual_loss(train_params):
    """The perceptual loss of ``train_params`` or None when all its layer weights are 0.

    Keys: ``scales``, ``loss_weights.perceptual``, ``perceptual_pretrained``,
    ``perceptual_weights_path``.
    """
    layer_weights = train_params["loss_weights"]["perceptual"]
    if not any(layer_weights):
        return None
    return PerceptualPyramidLoss(train_params["scales"], layer_weights,
                                 weights_path=train_params.get("perceptual_weights_path"),
                                 imagenet=train_params.get("perceptual_pretrained", True))


# ----------------------------------------------------------------------------- GAN
def lsgan_generator_loss(discriminator_fake):
    """Eq. 16: sum over scales of mean (1 - D(D_rec))^2."""
    return sum(((1 - out["prediction"]) ** 2).mean() for out in discriminator_fake.values())


def lsgan_discriminator_loss(discriminator_real, discriminator_fake):
    """Eq. 17: sum over scales of mean (1 - D(D))^2 + mean D(D_rec)^2."""
    total = 0
    for scale, real in discriminator_real.items():
        fake = discriminator_fake[scale]
        total = total + ((1 - real["prediction"]) ** 2).mean() + (fake["prediction"] ** 2).mean()
    return total


def feature_matching_loss(discriminator_real, discriminator_fake, layer_weights):
    """Sum over scales and discriminator blocks of ``weight * mean |F_real - F_fake|``.

    Real features are targets (detached).
    """
    total = 0
    for scale, real in discriminator_real.items():
        fake = discriminator_fake[scale]
        for weight, real_feature, fake_feature in zip(layer_weights, real["features"],
                                                      fake["features"]):
            if weight:
                total = total + weight * (real_feature.detach() - fake_feature).abs().mean()
    return total


# ----------------------------------------------------------------------------- equivariance
def equivariance_value_loss(kp_driving, kp_transformed, transform):
    """Eq. 19: mean |p_D - T(p_{D_T})|, T the random transform that made D_T from D."""
    back = transform.transform_coordinates(kp_transformed["value"])
    return (kp_driving["value"] - back).abs().mean()


def equivariance_jacobian_loss(kp_driving, kp_transformed, transform):
    """FOMM's Jacobian constraint: mean |I - J_D^-1 (dT(p_{D_T}) J_{D_T})|."""
    transform_jacobian = transform.jacobian(kp_transformed["value"])
    carried = transform_jacobian @ kp_transformed["jacobian"]
    normalized = torch.linalg.inv(kp_driving["jacobian"]) @ carried
    eye = torch.eye(2, dtype=normalized.dtype, device=normalized.device)
    return (eye - normalized).abs().mean()


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "vgg19_hub_path", "load_vgg19_features", "Vgg19Features",
    "PerceptualPyramidLoss", "build_perceptual_loss", "lsgan_generator_loss",
    "lsgan_discriminator_loss", "feature_matching_loss", "equivariance_value_loss",
    "equivariance_jacobian_loss",
]
