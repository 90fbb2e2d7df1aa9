"""The flow-and-occlusion completion network of seed 003 (section "Flow-and-Occlusion
Completion", eq. 5-7).

    {F_p, O_p, M_f, M_o} = F_c(I_s, v~_d)                                     eq. 5
    F = M_f * F_p + (1 - M_f) * F_c                                           eq. 6
    O = M_o * O_p + (1 - M_o) * O_c                                           eq. 7

v~_d = (beta_d, p_d) is the driving expression and pose; in this project's codes that is the
expression coefficients, the pose (global rotation, and the jaw, which is expression in BFM's
terms) and the weak-perspective camera (scale and translation: the rest of p).

Architecture (the paper shows it only as a figure; these are our choices): a mapping network
(fully connected layers with leaky ReLU) turns v~_d into a latent vector; the source image, at
``scale_factor`` of its size, goes through an encoder of down blocks and a decoder of up blocks
with U-Net skips, each decoder block's normalization an AdaIN of the latent (Huang and Belongie
2017, eq. 5's injection). AdaIN sits only in the decoder, so the encoder's features depend on the
source alone and inference computes them once per source (``encode``). A 7x7 convolution gives
the outputs: a displacement added to the identity grid (F_p, a backward flow), and sigmoids for
O_p (1 = visible), M_f and M_o (1 = trust the prediction). The head starts at zero: F_p starts
as the identity and every map at 0.5.

Ablation rows (seed 003 Table 3): without flow guidance there is no M_f and F = F_p, without
occlusion guidance no M_o and O = O_p (``flow_guidance``, ``occlusion_guidance``).
"""
import torch
import torch.nn.functional as F
from torch import nn

from modules.blocks import DownBlock2d, SameBlock2d, level_channels
from modules.coords import displacement_to_flow, resize_flow, resize_map
from modules.norms import AdaIN


class MappingNetwork(nn.Module):
    """``num_layers`` fully connected layers (leaky ReLU 0.1): a code vector -> a latent."""

    def __init__(self, input_dim, latent_dim=256, num_layers=3):
        super().__init__()
        layers, width = [], input_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, latent_dim), nn.LeakyReLU(0.1)]
            width = latent_dim
        self.layers = nn.Sequential(*layers)

    def forward(self, codes):
        return self.layers(codes)


class AdaINUpBlock(nn.Module):
    """2x nearest upsampling -> 3x3 conv -> AdaIN(latent) -> ReLU."""

    def __init__(self, in_features, out_features, latent_dim):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, 3, padding=1)
        self.norm = AdaIN(out_features, latent_dim)

    def forward(self, x, latent):
        x = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        return F.relu(self.norm(x, latent))


class CompletionNetwork(nn.Module):
    """F_c of eq. 5: source image and driving motion codes -> F_p, O_p, M_f, M_o.

    Args:
        motion_dim: length of v~_d (expression + pose + camera).
        num_channels: image channels (3).
        block_expansion, max_features, num_blocks: the encoder-decoder's widths and depth
            (channels ``block_expansion * 2^level``, capped); the input side at ``scale_factor``
            must be divisible by ``2^num_blocks``.
        latent_dim, mapping_layers: the mapping network.
        scale_factor: the resolution it works at, relative to the source image.
        flow_guidance, occlusion_guidance: predict the fusion masks M_f / M_o.
        norm: the encoder's normalization ('instance', 'batch', 'none').

    ``forward(source, motion, features=None)`` -> dict ``flow`` (F_p, B x h x w x 2), ``occlusion``
    (O_p, B x 1 x h x w), and ``flow_mask`` (M_f) / ``occlusion_mask`` (M_o) when guided, at the
    working resolution. ``features`` are ``encode(source)``'s, computed once per source.
    """

    def __init__(self, motion_dim, num_channels=3, block_expansion=32, max_features=256,
                 num_blocks=4, latent_dim=256, mapping_layers=3, scale_factor=0.25,
                 flow_guidance=True, occlusion_guidance=True, norm="instance"):
        super().__init__()
        self.scale_factor = scale_factor
        self.flow_guidance, self.occlusion_guidance = flow_guidance, occlusion_guidance
        self.mapping = MappingNetwork(motion_dim, latent_dim, mapping_layers)
        self.first = SameBlock2d(num_channels, block_expansion, kernel_size=7, padding=3, norm=norm)
        widths = [block_expansion] + [level_channels(block_expansion, i + 1, max_features)
                                      for i in range(num_blocks)]
        self.down_blocks = nn.ModuleList(DownBlock2d(widths[i], widths[i + 1], norm=norm)
                                         for i in range(num_blocks))
        self.up_blocks = nn.ModuleList(
            AdaINUpBlock(widths[i + 1] * (1 if i == num_blocks - 1 else 2), widths[i], latent_dim)
            for i in reversed(range(num_blocks)))
        self.out_channels = 3 + int(flow_guidance) + int(occlusion_guidance)
        self.head = nn.Conv2d(2 * block_expansion, self.out_channels, 7, padding=3)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def working_size(self, size):
        return tuple(max(1, int(round(s * self.scale_factor))) for s in size)

    def encode(self, source):
        """The encoder's features of the source (finest first), at the working resolution."""
        x = resize_map(source, self.working_size(source.shape[-2:]))
        features = [self.first(x)]
        for block in self.down_blocks:
            features.append(block(features[-1]))
        return features

    def forward(self, source, motion, features=None):
        features = self.encode(source) if features is None else features
        latent = self.mapping(motion)
        skips = list(features)
        x = skips.pop()
        for block in self.up_blocks:
            x = torch.cat([block(x, latent), skips.pop()], dim=1)
        out = self.head(x)
        result = {"flow": displacement_to_flow(out[:, 0:2]),                 # F_p
                  "occlusion": torch.sigmoid(out[:, 2:3])}                  # O_p
        channel = 3
        if self.flow_guidance:
            result["flow_mask"] = torch.sigmoid(out[:, channel:channel + 1])  # M_f
            channel += 1
        if self.occlusion_guidance:
            result["occlusion_mask"] = torch.sigmoid(out[:, channel:channel + 1])  # M_o
        return result


def fuse_guidance(predicted, computed_flow=None, computed_occlusion=None):
    """Eqs. 6-7 at the computed maps' resolution: the predicted maps (``CompletionNetwork``'s
    output, any resolution) are resized to the computed ones and blended by the masks. Without a
    computed map (or without its mask) the prediction is used as is. Returns ``(F, O)``."""
    flow, occlusion = predicted["flow"], predicted["occlusion"]
    if computed_flow is not None and "flow_mask" in predicted:
        size = computed_flow.shape[1:3]
        mask = resize_map(predicted["flow_mask"], size).permute(0, 2, 3, 1)       # M_f
        flow = mask * resize_flow(flow, size) + (1 - mask) * computed_flow       # eq. 6
    if computed_occlusion is not None and "occlusion_mask" in predicted:
        size = computed_occlusion.shape[-2:]
        mask = resize_map(predicted["occlusion_mask"], size)                      # M_o
        occlusion = mask * resize_map(occlusion, size) + (1 - mask) * computed_occlusion  # eq. 7
    return flow, occlusion


__all__ = ["MappingNetwork", "AdaINUpBlock", "CompletionNetwork", "fuse_guidance"]
