"""The reenactment network F_r of seed 003 (section "Reenacting", its figure 4).

An encoder-decoder that turns the source image I_s into the reenacted image I_g. The source's
encoder features at every scale are warped by the complete flow F and then masked by the complete
occlusion map O (0 = occluded: to be inpainted) before they reach the decoder: the deepest one is
the decoder's input, the others are its skip connections. The decoder is modulated by SPADE
(Park et al. 2019) on the rendered image I_r (synthesis guidance), "to guide the restoration of
missing contents caused by occlusions".

Our choices where the paper only has a figure: down blocks conv-norm-ReLU-avgpool (channels
``block_expansion * 2^level``, capped at ``max_features``) after a 7x7 first block; decoder blocks
are SPADE residual blocks (SPADE's generator block, without spectral norm since the paper trains
no discriminator), one per level after a 2x nearest upsampling and the concatenated skip, plus
``num_bottleneck_blocks`` at the deepest level; a 7x7 convolution and a sigmoid give the image.
Without synthesis guidance (Table 3 rows without SG, ``guidance_channels=0``) the decoder blocks
are plain: conv-norm-ReLU and a residual block.
"""
import torch
import torch.nn.functional as F
from torch import nn

from modules.blocks import DownBlock2d, ResBlock2d, SameBlock2d, level_channels
from modules.coords import resize_map, warp
from modules.norms import SPADEResBlock


class PlainDecoderBlock(nn.Module):
    """conv-norm-ReLU then a residual block: the decoder block without synthesis guidance."""

    def __init__(self, in_features, out_features, norm="instance"):
        super().__init__()
        self.same = SameBlock2d(in_features, out_features, norm=norm)
        self.res = ResBlock2d(out_features, norm=norm)

    def forward(self, x, guidance=None):
        return self.res(self.same(x))


def decoder_block(in_features, out_features, guidance_channels, hidden, norm):
    if guidance_channels:
        return SPADEResBlock(in_features, out_features, guidance_channels, norm=norm,
                             spectral=False, hidden=hidden)
    return PlainDecoderBlock(in_features, out_features, norm)


def warp_and_mask(features, flow, occlusion):
    """Every feature map warped by the backward ``flow`` (B x H x W x 2) and multiplied by the
    ``occlusion`` map (B x 1 x H x W, resized to each)."""
    return [warp(f, flow) * resize_map(occlusion, f.shape[-2:]).to(f.dtype) for f in features]


class ReenactmentGenerator(nn.Module):
    """F_r: ``forward(source, flow, occlusion, rendered=None, features=None)`` -> dict with
    ``prediction`` (B x 3 x H x W in [0, 1]).

    ``flow``: F (B x h x w x 2, any resolution: resized to each feature map); ``occlusion``: O
    (B x 1 x h x w); ``rendered``: I_r (B x ``guidance_channels`` x h x w; ignored, and may be
    None, when ``guidance_channels`` is 0); ``features``: ``encode(source)``, computed once per
    source. The source side must be divisible by ``2^num_down_blocks``.
    """

    def __init__(self, num_channels=3, block_expansion=64, max_features=512, num_down_blocks=3,
                 num_bottleneck_blocks=2, guidance_channels=3, spade_hidden=128, norm="instance"):
        super().__init__()
        self.guidance_channels = guidance_channels
        widths = [block_expansion] + [level_channels(block_expansion, i + 1, max_features)
                                      for i in range(num_down_blocks)]
        self.first = SameBlock2d(num_channels, block_expansion, kernel_size=7, padding=3, norm=norm)
        self.down_blocks = nn.ModuleList(DownBlock2d(widths[i], widths[i + 1], norm=norm)
                                         for i in range(num_down_blocks))
        settings = (guidance_channels, spade_hidden, norm)
        self.bottleneck = nn.ModuleList(decoder_block(widths[-1], widths[-1], *settings)
                                        for _ in range(num_bottleneck_blocks))
        self.up_blocks = nn.ModuleList(
            decoder_block(widths[i + 1] + widths[i], widths[i], *settings)
            for i in reversed(range(num_down_blocks)))
        self.final = nn.Conv2d(block_expansion, num_channels, 7, padding=3)

    def encode(self, source):
        """The source's encoder features, finest first (computed once per source)."""
        features = [self.first(source)]
        for block in self.down_blocks:
            features.append(block(features[-1]))
        return features

    def forward(self, source, flow, occlusion, rendered=None, features=None):
        if self.guidance_channels and rendered is None:
            raise ValueError("this reenactment network has synthesis guidance "
                             "(guidance_channels > 0): give the rendered image I_r")
        features = self.encode(source) if features is None else features
        warped = warp_and_mask(features, flow, occlusion)
        x = warped.pop()
        for block in self.bottleneck:
            x = block(x, rendered)
        for block in self.up_blocks:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = block(torch.cat([x, warped.pop()], dim=1), rendered)
        return {"prediction": torch.sigmoid(self.final(x))}


__all__ = ["ReenactmentGenerator", "PlainDecoderBlock", "warp_and_mask"]
