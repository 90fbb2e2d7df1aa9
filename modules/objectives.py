"""Training objectives that models hold (composed, not inherited): the VGG-19 perceptual pyramid,
the adversarial objective (multi-scale discriminator, LSGAN or hinge, feature matching) and FOMM's
equivariance constraints (SAFA appendix A, eqs. 15-17 and 19).

A model builds the ones it uses from ``train_params`` (weights in ``loss_weights``):

    self.perceptual = PerceptualPyramid.from_config(train_params)       # None if all weights 0
    self.adversarial = AdversarialObjective(discriminator, train_params)  # an nn.Module
    self.equivariance = EquivarianceObjective.from_config(train_params)   # None if weights 0

``AdversarialObjective`` owns the discriminator (its weights are trained and checkpointed: the
``discriminator`` optimizer group). ``PerceptualPyramid`` is not a module: its frozen VGG-19 is
loaded once per process on first use, shared by every model, and never enters a state dict or an
optimizer.

VGG-19 weights are never downloaded: torchvision's ImageNet file
(``torchvision.models.VGG19_Weights.IMAGENET1K_V1``) at an explicit path from the config or in the
torch hub cache (``<torch.hub.get_dir()>/checkpoints/vgg19-dcbb9e9d.pth``). Without the file the
loss refuses to start unless the config explicitly allows a random VGG (tiny test configs).
"""
import os

import torch
import torchvision
from torch import nn

from modules.precision import full_precision
from modules.util import ImagePyramid, RandomTransform, inverse

GAN_LOSSES = ("lsgan", "hinge")
# train_params shared by every model that uses these objectives (each model may override)
OBJECTIVE_TRAIN_PARAMS = {
    "scales": [1.0, 0.5, 0.25, 0.125],  # image pyramid of the perceptual loss
    "gan_loss": "lsgan",                # or 'hinge'
    "loss_weights": {
        "perceptual": [10.0, 10.0, 10.0, 10.0, 10.0],   # relu1_1 .. relu5_1
        "generator_gan": 0.0,          # non-zero turns on the GAN and feature matching terms
        "discriminator_gan": 1.0,
        "feature_matching": [10.0, 10.0, 10.0, 10.0],   # one per discriminator block
        "equivariance_value": 10.0,
        "equivariance_jacobian": 10.0,
    },
    # the random warp of the equivariance losses; tps_kernel 'reference' (FOMM's) or 'euclidean'
    "transform_params": {"sigma_affine": 0.05, "sigma_tps": 0.005, "points_tps": 5,
                         "tps_kernel": "reference"},
    # VGG-19 ImageNet weights of the perceptual loss: this file, else torchvision's file in the
    # torch hub cache (<torch hub dir>/checkpoints/vgg19-dcbb9e9d.pth); missing -> error.
    "perceptual_weights_path": None,
    # false = a fixed, seeded random VGG-19 (tests and smoke runs only; no file needed)
    "perceptual_pretrained": True,
}


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


_SHARED_VGG = {}


def shared_vgg19(weights_path, imagenet, device, dtype):
    """One frozen :class:`Vgg19Features` per (file, device, dtype) in this process."""
    key = (weights_path, bool(imagenet), str(device), dtype)
    if key not in _SHARED_VGG:
        _SHARED_VGG[key] = Vgg19Features(weights_path, imagenet).to(device=device, dtype=dtype)
    return _SHARED_VGG[key]


# Losses reduce in float32 under autocast (modules/precision.py): a 16-bit mean over a million
# feature differences keeps only about three significant digits of it, and the discriminator's
# squared outputs lose more.
@full_precision
def mean_absolute_difference(a, b):
    """``mean |a - b|`` in float32 (or float64 for float64 inputs)."""
    return (a - b).abs().mean()


class PerceptualPyramid:
    """Eq. 15: sum over pyramid scales and VGG layers of ``layer_weight * mean |f(D) - f(D_rec)|``.

    Scales as FOMM's ``[1, 0.5, 0.25, 0.125]``; one weight per relu slice. The target's features
    carry no gradient. The VGG-19 loads on the first call (inference never needs its file).
    """

    def __init__(self, scales, layer_weights, weights_path=None, imagenet=True):
        if len(layer_weights) != len(VGG19_SLICE_ENDS):
            raise ValueError(f"perceptual loss weights need one value per VGG-19 slice "
                             f"({len(VGG19_SLICE_ENDS)}), got {list(layer_weights)}")
        self.layer_weights = [float(w) for w in layer_weights]
        self.pyramid = ImagePyramid(scales)
        self.weights_path, self.imagenet = weights_path, imagenet

    @classmethod
    def from_config(cls, train_params):
        """The perceptual loss of ``train_params``, or None when all its layer weights are 0."""
        layer_weights = train_params["loss_weights"]["perceptual"]
        if not any(layer_weights):
            return None
        return cls(train_params["scales"], layer_weights, train_params["perceptual_weights_path"],
                   train_params["perceptual_pretrained"])

    def vgg(self, like):
        return shared_vgg19(self.weights_path, self.imagenet, like.device, like.dtype)

    def __call__(self, prediction, target):
        self.pyramid.to(prediction.device)
        predicted, real = self.pyramid(prediction), self.pyramid(target)
        self.check_sizes(predicted)
        vgg = self.vgg(prediction)
        total = prediction.new_zeros(())
        for scale in predicted:
            predicted_features = vgg(predicted[scale])
            with torch.no_grad():
                real_features = vgg(real[scale])
            for weight, fake, true in zip(self.layer_weights, predicted_features, real_features):
                if weight:
                    total = total + weight * mean_absolute_difference(fake, true)
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


# ----------------------------------------------------------------------------- GAN
@full_precision   # a loss's reduction in float32, as mean_absolute_difference
def gan_generator_loss(discriminator_fake, kind="lsgan"):
    """Eq. 16 (LSGAN): sum over scales of mean (1 - D(D_rec))^2; hinge: - mean D(D_rec)."""
    if kind == "hinge":
        return sum(-out["prediction"].mean() for out in discriminator_fake.values())
    return sum(((1 - out["prediction"]) ** 2).mean() for out in discriminator_fake.values())


@full_precision   # a loss's reduction in float32, as mean_absolute_difference
def gan_discriminator_loss(discriminator_real, discriminator_fake, kind="lsgan"):
    """Eq. 17 (LSGAN): sum over scales of mean (1 - D(D))^2 + mean D(D_rec)^2;
    hinge: mean relu(1 - D(D)) + mean relu(1 + D(D_rec))."""
    total = 0
    for scale, real in discriminator_real.items():
        real, fake = real["prediction"], discriminator_fake[scale]["prediction"]
        if kind == "hinge":
            total = total + torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()
        else:
            total = total + ((1 - real) ** 2).mean() + (fake ** 2).mean()
    return total


@full_precision   # a loss's reduction in float32, as mean_absolute_difference
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


class AdversarialObjective(nn.Module):
    """A discriminator and its losses: GAN (LSGAN or hinge) and feature matching for the
    generator step, the GAN loss for the discriminator step. Active when
    ``loss_weights.generator_gan`` != 0 (FOMM's rule: the VoxCeleb config trains without it).

    ``condition`` is whatever the discriminator takes besides the image (FOMM/SAFA: keypoints,
    detached here), or None.
    """

    def __init__(self, discriminator, train_params):
        super().__init__()
        self.discriminator = discriminator
        self.kind = train_params["gan_loss"]
        if self.kind not in GAN_LOSSES:
            raise ValueError(f"train_params.gan_loss {self.kind!r}: expected one of {GAN_LOSSES}")
        weights = train_params["loss_weights"]
        self.generator_weight = weights["generator_gan"]
        self.discriminator_weight = weights["discriminator_gan"]
        self.feature_matching_weights = list(weights["feature_matching"])

    @property
    def enabled(self):
        return self.generator_weight != 0

    def with_discriminator(self, groups):
        """A model's ``{group: [parameters]}`` plus the 'discriminator' group when active
        (without GAN losses the discriminator is never trained)."""
        if self.enabled:
            groups["discriminator"] = list(self.parameters())
        return groups

    @property
    def group_names(self):
        """The optimizer groups the discriminator step updates: ('discriminator',) or ()."""
        return ("discriminator",) if self.enabled else ()

    @staticmethod
    def _detached(condition):
        if isinstance(condition, dict):
            return {key: value.detach() for key, value in condition.items()}
        return condition.detach() if torch.is_tensor(condition) else condition

    def generator_losses(self, fake_image, real_image, condition=None):
        """``{generator_gan, feature_matching}`` for the generator step; {} when disabled."""
        if not self.enabled:
            return {}
        condition = self._detached(condition)
        fake = self.discriminator(fake_image, condition)
        with torch.no_grad():
            real = self.discriminator(real_image, condition)
        losses = {"generator_gan": self.generator_weight * gan_generator_loss(fake, self.kind)}
        if any(self.feature_matching_weights):
            losses["feature_matching"] = feature_matching_loss(real, fake,
                                                               self.feature_matching_weights)
        return losses

    def discriminator_losses(self, real_image, fake_image, condition=None):
        """``{discriminator_gan}`` on the detached fake; {} when disabled."""
        if not self.enabled:
            return {}
        condition = self._detached(condition)
        real = self.discriminator(real_image, condition)
        fake = self.discriminator(fake_image.detach(), condition)
        return {"discriminator_gan": self.discriminator_weight * gan_discriminator_loss(
            real, fake, self.kind)}


# ----------------------------------------------------------------------------- equivariance
class EquivarianceObjective:
    """FOMM's equivariance constraints on a keypoint detector (eq. 19 and the Jacobian term).

    The detector sees the driving frame D and a randomly warped copy D_T = D o T (affine + thin
    plate spline, ``transform_params``); keypoints found in D_T, mapped through T, must land on
    those of D (value term), and their Jacobians carried by dT must equal D's (Jacobian term:
    mean |I - J_D^-1 dT(p_{D_T}) J_{D_T}|).
    """

    def __init__(self, transform_params, value_weight, jacobian_weight, align_corners=False):
        self.transform_params = dict(transform_params, align_corners=align_corners)
        self.value_weight, self.jacobian_weight = value_weight, jacobian_weight

    @classmethod
    def from_config(cls, train_params, align_corners=False):
        weights = train_params["loss_weights"]
        if not (weights["equivariance_value"] or weights["equivariance_jacobian"]):
            return None
        return cls(train_params["transform_params"], weights["equivariance_value"],
                   weights["equivariance_jacobian"], align_corners)

    def __call__(self, detector, driving, kp_driving, generated=None, transform=None):
        """Losses ``{equivariance_value, equivariance_jacobian}`` (those with non-zero weight).

        ``transform``: a given :class:`RandomTransform` (tests replay a recorded one); by
        default a new one is drawn. ``generated`` (a dict) receives the transformed frame and
        its keypoints for the visual grids.
        """
        if transform is None:
            transform = RandomTransform(driving.shape[0], dtype=driving.dtype,
                                        device=driving.device, **self.transform_params)
        transformed_frame = transform.transform_image(driving)
        kp_transformed = detector(transformed_frame)
        if generated is not None:
            generated.update(transformed_frame=transformed_frame, transformed_kp=kp_transformed)
        return self.terms(transform, kp_driving, kp_transformed)

    # Float32 under autocast (modules/precision.py): coordinates through T, and products and
    # inverses of 2x2 Jacobians, which 16 bits would make the loss's own noise floor.
    @full_precision
    def terms(self, transform, kp_driving, kp_transformed):
        """The value and Jacobian terms from the keypoints of D and of D_T = D o T."""
        losses = {}
        if self.value_weight:
            back = transform.transform_coordinates(kp_transformed["value"])     # T(p_{D_T})
            losses["equivariance_value"] = self.value_weight * (
                kp_driving["value"] - back).abs().mean()
        if self.jacobian_weight and "jacobian" in kp_driving:
            carried = transform.jacobian(kp_transformed["value"]) @ kp_transformed["jacobian"]
            normalized = inverse(kp_driving["jacobian"]) @ carried
            eye = torch.eye(normalized.shape[-1], dtype=normalized.dtype,
                            device=normalized.device)
            losses["equivariance_jacobian"] = self.jacobian_weight * (
                eye - normalized).abs().mean()
        return losses


__all__ = ["GAN_LOSSES", "OBJECTIVE_TRAIN_PARAMS", "IMAGENET_MEAN", "IMAGENET_STD",
           "vgg19_hub_path", "load_vgg19_features", "Vgg19Features", "shared_vgg19",
           "PerceptualPyramid", "gan_generator_loss", "gan_discriminator_loss",
           "feature_matching_loss", "AdversarialObjective", "EquivarianceObjective"]
