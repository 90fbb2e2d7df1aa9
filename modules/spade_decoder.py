"""SPADE image decoder of face-vid2vid's released generator (``OcclusionAwareSPADEGenerator``).

The warped, occlusion-masked 2D feature map is both the input and the SPADE condition of every
block (Park et al. 2019 style, here self-conditioned):

    x = conv3x3(f)                                       in_features -> 2 in_features
    x = SPADEResBlock_i(x, f), i = 1 .. num_middle_blocks (2 in_features)
    x = up2(x); x = SPADEResBlock(x, f)                  -> in_features
    x = up2(x); x = SPADEResBlock(x, f)                  -> out_features
    image = sigmoid(conv3x3(leaky_relu(x, 0.2)))

Blocks: instance norm, spectral norm on the blocks' convolutions (not on SPADE's own), SPADE
hidden width 128 (``modules.norms.SPADEResBlock``). The reference hard-codes in_features 256,
out_features 64 and 6 middle blocks (about 46 M parameters at full size).
"""
import torch
import torch.nn.functional as F
from torch import nn

from modules.norms import SPADEResBlock


class SPADEDecoder(nn.Module):
    """``forward(feature B x in_features x h x w)`` -> image ``B x image_channel x 4h x 4w``."""

    def __init__(self, in_features=256, out_features=64, num_middle_blocks=6, image_channel=3,
                 hidden=128):
        super().__init__()
        width = 2 * in_features
        block = dict(label_nc=in_features, norm="instance", spectral=True, spade_spectral=False,
                     hidden=hidden)
        self.fc = nn.Conv2d(in_features, width, kernel_size=3, padding=1)
        self.middle_blocks = nn.ModuleList(SPADEResBlock(width, width, **block)
                                           for _ in range(num_middle_blocks))
        self.up_blocks = nn.ModuleList([SPADEResBlock(width, in_features, **block),
                                        SPADEResBlock(in_features, out_features, **block)])
        self.conv_img = nn.Conv2d(out_features, image_channel, kernel_size=3, padding=1)

    def forward(self, feature):
        x = self.fc(feature)
        for block in self.middle_blocks:
            x = block(x, feature)
        for block in self.up_blocks:
            x = block(F.interpolate(x, scale_factor=2, mode="nearest"), feature)
        return torch.sigmoid(self.conv_img(F.leaky_relu(x, 0.2)))
