"""3D convolutional blocks for feature volumes ``B x C x D x H x W`` (face-vid2vid and MMFA).

The 2D counterparts live in ``modules/blocks.py``. Up and down blocks change only the spatial
size (H, W); the depth D stays, as in face-vid2vid, whose volumes are shallow (D = 16) and whose
2D encoders reshape channels into depth. Normalization is affine ``BatchNorm3d``.
"""
import torch
import torch.nn.functional as F
from torch import nn

from modules.blocks import level_channels, make_norm


def make_norm_3d(num_features, kind="batch"):
    """A 3D normalization layer: 'batch' (affine BatchNorm3d), 'instance' (affine) or 'none'."""
    return make_norm(num_features, kind, dims=3)


class DownBlock3d(nn.Module):
    """conv -> norm -> ReLU -> 1x2x2 average pooling (half height and width, same depth)."""

    def __init__(self, in_features, out_features, kernel_size=3, padding=1, norm="batch"):
        super().__init__()
        self.conv = nn.Conv3d(in_features, out_features, kernel_size, padding=padding)
        self.norm = make_norm_3d(out_features, norm)

    def forward(self, x):
        return F.avg_pool3d(F.relu(self.norm(self.conv(x))), kernel_size=(1, 2, 2))


class UpBlock3d(nn.Module):
    """1x2x2 nearest upsampling -> conv -> norm -> ReLU (double height and width, same depth)."""

    def __init__(self, in_features, out_features, kernel_size=3, padding=1, norm="batch"):
        super().__init__()
        self.conv = nn.Conv3d(in_features, out_features, kernel_size, padding=padding)
        self.norm = make_norm_3d(out_features, norm)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        return F.relu(self.norm(self.conv(x)))


class ResBlock3d(nn.Module):
    """Pre-activation residual block: x + conv(relu(norm(conv(relu(norm(x))))))."""

    def __init__(self, features, kernel_size=3, padding=1, norm="batch"):
        super().__init__()
        self.norm1 = make_norm_3d(features, norm)
        self.conv1 = nn.Conv3d(features, features, kernel_size, padding=padding)
        self.norm2 = make_norm_3d(features, norm)
        self.conv2 = nn.Conv3d(features, features, kernel_size, padding=padding)

    def forward(self, x):
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return x + out


class Encoder3d(nn.Module):
    """``num_blocks`` 3D down blocks; returns the input and every block's output, finest first."""

    def __init__(self, block_expansion, in_features, num_blocks=3, max_features=256, norm="batch"):
        super().__init__()
        channels = [in_features] + [level_channels(block_expansion, i + 1, max_features)
                                    for i in range(num_blocks)]
        self.down_blocks = nn.ModuleList(
            DownBlock3d(channels[i], channels[i + 1], norm=norm) for i in range(num_blocks))

    def forward(self, x):
        features = [x]
        for block in self.down_blocks:
            features.append(block(features[-1]))
        return features


class Decoder3d(nn.Module):
    """3D up blocks with encoder skips, then a 3x3x3 conv -> norm -> ReLU over the last concat.

    Output channels ``out_filters = block_expansion + in_features`` (the last up block's output
    concatenated with the hourglass input), kept by the final convolution.
    """

    def __init__(self, block_expansion, in_features, num_blocks=3, max_features=256, norm="batch"):
        super().__init__()
        blocks = []
        for level in reversed(range(num_blocks)):
            skip_factor = 1 if level == num_blocks - 1 else 2
            blocks.append(UpBlock3d(skip_factor * level_channels(block_expansion, level + 1,
                                                                 max_features),
                                    level_channels(block_expansion, level, max_features),
                                    norm=norm))
        self.up_blocks = nn.ModuleList(blocks)
        self.out_filters = block_expansion + in_features
        self.conv = nn.Conv3d(self.out_filters, self.out_filters, kernel_size=3, padding=1)
        self.norm = make_norm_3d(self.out_filters, norm)

    def forward(self, features):
        skips = list(features)
        out = skips.pop()
        for block in self.up_blocks:
            out = torch.cat([block(out), skips.pop()], dim=1)
        return F.relu(self.norm(self.conv(out)))


class Hourglass3d(nn.Module):
    """3D encoder-decoder with skips (U-Net over H and W); H, W divisible by ``2^num_blocks``."""

    def __init__(self, block_expansion, in_features, num_blocks=3, max_features=256, norm="batch"):
        super().__init__()
        self.encoder = Encoder3d(block_expansion, in_features, num_blocks, max_features, norm)
        self.decoder = Decoder3d(block_expansion, in_features, num_blocks, max_features, norm)
        self.out_filters = self.decoder.out_filters

    def forward(self, x):
        return self.decoder(self.encoder(x))
