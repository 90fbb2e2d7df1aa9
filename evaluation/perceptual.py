"""LPIPS (Zhang et al. 2018) with pluggable weights.

The metric: feed both images (mapped to [-1, 1] and then standardised by fixed per-channel shift
and scale) through an ImageNet backbone, take the activations at a few ReLU taps, scale each
activation vector to unit length over channels, square the difference, weight the channels with a
learned non-negative 1x1 layer per tap, average over positions and add over taps.

Two sets of weights are needed and both are loaded from files (``torch.load(weights_only=True)``):
the backbone's ImageNet weights (torchvision's file in the torch hub cache, or a path) and the
per-tap linear weights (the ``lpips`` package ships them as ``weights/v0.1/<net>.pth``; keys
``lin<k>.model.1.weight`` of shape ``1 x C x 1 x 1``).
"""
import re

import torch
import torchvision
from torch import nn

# Fixed input standardisation of the LPIPS paper's networks.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

# For each backbone: torchvision builder, weight enum, and the indices in ``.features`` after which
# an activation is tapped (the ReLUs that close conv1..conv5 or the fire modules).
BACKBONES = {
    "alex": ("alexnet", "AlexNet_Weights", (1, 4, 7, 9, 11)),
    "vgg": ("vgg16", "VGG16_Weights", (3, 8, 15, 22, 29)),
    "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights", (1, 4, 7, 9, 10, 11, 12)),
}


def backbone_weight_filename(name):
    """File name torchvision gives the backbone's ImageNet weights in the hub cache."""
    _, enum_name, _ = BACKBONES[name]
    weights = getattr(torchvision.models, enum_name).IMAGENET1K_V1
    return weights.url.rsplit("/", 1)[-1]


def load_linear_weights(path):
    """``[w_0, w_1, ...]`` (each ``1 x C x 1 x 1``) from an LPIPS linear-layer state dict file."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    found = {}
    for key, value in state.items():
        match = re.fullmatch(r"lin(\d+)\.model\.1\.weight", key)
        if match:
            found[int(match.group(1))] = value
    if not found or sorted(found) != list(range(len(found))):
        raise ValueError(f"{path} holds no LPIPS linear layers (keys lin<k>.model.1.weight)")
    return [found[k] for k in range(len(found))]


class LPIPS(nn.Module):
    """LPIPS distance per image pair; inputs ``B x 3 x H x W`` in [0, 1].

    ``backbone_state``: the torchvision model's state dict (``None`` keeps a random backbone, for
    tests only). ``linear_weights``: list of per-tap channel weights.
    """

    def __init__(self, net="alex", backbone_state=None, linear_weights=None):
        super().__init__()
        builder, _, taps = BACKBONES[net]
        model = getattr(torchvision.models, builder)(weights=None)
        if backbone_state is not None:
            model.load_state_dict(backbone_state)
        self.features = model.features[: taps[-1] + 1].eval()
        self.taps = taps
        if linear_weights is None or len(linear_weights) != len(taps):
            raise ValueError(f"LPIPS-{net} needs {len(taps)} linear weight tensors")
        self.linear = nn.ParameterList([nn.Parameter(w.detach().clone().float(), requires_grad=False)
                                        for w in linear_weights])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)

    def _activations(self, images):
        x = ((images * 2.0 - 1.0) - self.shift) / self.scale
        outputs = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                outputs.append(x)
        return outputs

    @staticmethod
    def _unit(features, eps=1e-10):
        return features / (features.pow(2).sum(1, keepdim=True).sqrt() + eps)

    def forward(self, images_a, images_b):
        total = 0.0
        for fa, fb, weight in zip(self._activations(images_a), self._activations(images_b),
                                  self.linear):
            squared = (self._unit(fa) - self._unit(fb)) ** 2
            total = total + nn.functional.conv2d(squared, weight).mean(dim=(1, 2, 3))
        return total
