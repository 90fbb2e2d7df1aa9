"""Convolutional building blocks shared by every network: conv blocks, encoder, decoder, hourglass.

Normalization comes from one factory, :func:`make_norm`. Batch norm is plain ``nn.BatchNorm2d``
(affine); for multi-GPU training the trainer turns it into synchronized batch norm with
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (which refuses CPU modules, so it is not done
here).
"""
import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "instance", "none")


_NORM_CLASSES = {2: (nn.BatchNorm2d, nn.InstanceNorm2d), 3: (nn.BatchNorm3d, nn.InstanceNorm3d)}


def make_norm(num_features, kind="batch", affine=True, dims=2):
    """A normalization layer of ``dims``-D feature maps: 'batch', 'instance' (both with a learned
    affine unless ``affine`` is false) or 'none' (identity)."""
    batch_norm, instance_norm = _NORM_CLASSES[dims]
    if kind == "batch":
        return batch_norm(num_features, affine=affine)
    if kind == "instance":
        return instance_norm(num_features, affine=affine)
    if kind in (None, "none"):
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; expected one of {NORMS}")


def level_channels(block_expansion, level, max_features):
    """Channels at pyramid ``level``: ``block_expansion * 2^level``, capped at ``max_features``."""
    return min(max_features, block_expansion * (2 ** level))


class SameBlock2d(nn.Module):
    """conv -> norm -> ReLU at the same resolution (leaky ReLU when ``negative_slope`` > 0)."""

    def __init__(self, in_features, out_features, kernel_size=3, padding=1, norm="batch",
                 negative_slope=0.0):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size, padding=padding)
        self.norm = make_norm(out_features, norm)
        self.negative_slope = negative_slope

    def forward(self, x):
        out = self.norm(self.conv(x))
        return F.leaky_relu(out, self.negative_slope) if self.negative_slope else F.relu(out)


class DownBlock2d(nn.Module):
    """conv -> norm -> ReLU -> 2x2 average pooling (half resolution)."""

    def __init__(self, in_features, out_features, kernel_size=3, padding=1, norm="batch"):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size, padding=padding)
        self.norm = make_norm(out_features, norm)

    def forward(self, x):
        return F.avg_pool2d(F.relu(self.norm(self.conv(x))), kernel_size=2)


class UpBlock2d(nn.Module):
    """2x nearest upsampling -> conv -> norm -> ReLU (double resolution)."""

    def __init__(self, in_features, out_features, kernel_size=3, padding=1, norm="batch"):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size, padding=padding)
        self.norm = make_norm(out_features, norm)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return F.relu(self.norm(self.conv(x)))


class ResBlock2d(nn.Module):
    """Pre-activation residual block: x + conv(relu(norm(conv(relu(norm(x))))))."""

    def __init__(self, features, kernel_size=3, padding=1, norm="batch"):
        super().__init__()
        self.norm1 = make_norm(features, norm)
        self.conv1 = nn.Conv2d(features, features, kernel_size, padding=padding)
        self.norm2 = make_norm(features, norm)
        self.conv2 = nn.Conv2d(features, features, kernel_size, padding=padding)

    def forward(self, x):
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return x + out


class Encoder(nn.Module):
    """``num_blocks`` down blocks; returns the input and every block's output, finest first."""

    def __init__(self, block_expansion, in_features, num_blocks=3, max_features=256, norm="batch"):
        super().__init__()
        channels = [in_features] + [level_channels(block_expansion, i + 1, max_features)
                                    for i in range(num_blocks)]
        self.down_blocks = nn.ModuleList(
            DownBlock2d(channels[i], channels[i + 1], norm=norm) for i in range(num_blocks))
        self.out_channels = channels

    def forward(self, x):
        features = [x]
        for block in self.down_blocks:
            features.append(block(features[-1]))
        return features


class Decoder(nn.Module):
    """Up blocks from the coarsest encoder feature, concatenating the encoder skip at each level.

    Output channels: ``block_expansion + in_features`` (``out_filters``).
    """

    def __init__(self, block_expansion, in_features, num_blocks=3, max_features=256, norm="batch"):
        super().__init__()
        blocks = []
        for level in reversed(range(num_blocks)):
            skip_factor = 1 if level == num_blocks - 1 else 2
            blocks.append(UpBlock2d(skip_factor * level_channels(block_expansion, level + 1,
                                                                 max_features),
                                    level_channels(block_expansion, level, max_features),
                                    norm=norm))
        self.up_blocks = nn.ModuleList(blocks)
        self.out_filters = block_expansion + in_features

    def forward(self, features):
        skips = list(features)
        out = skips.pop()
        for block in self.up_blocks:
            out = torch.cat([block(out), skips.pop()], dim=1)
        return out


class Hourglass(nn.Module):
    """Encoder-decoder with skips (U-Net); input size must be divisible by ``2^num_blocks``."""

    def __init__(self, block_expansion, in_features, num_blocks=3, max_features=256, norm="batch"):
        super().__init__()
        self.encoder = Encoder(block_expansion, in_features, num_blocks, max_features, norm)
        self.decoder = Decoder(block_expansion, in_features, num_blocks, max_features, norm)
        self.out_filters = self.decoder.out_filters

    def forward(self, x):
        return self.decoder(self.encoder(x))


class HierarchicalBlock(nn.Module):
    """FAN's residual block (Bulat and Tzimiropoulos 2017): three pre-activated 3x3 convolutions
    in a chain with ``out/2``, ``out/4`` and ``out/4`` channels, their outputs concatenated
    (receptive fields 3, 5 and 7 in one block) and added to the shortcut (identity, or
    norm -> ReLU -> 1x1 conv when the channel count changes)."""

    def __init__(self, in_features, out_features, norm="batch"):
        super().__init__()
        if out_features % 4:
            raise ValueError(f"HierarchicalBlock needs out_features divisible by 4, got "
                             f"{out_features}")
        widths = (out_features // 2, out_features // 4, out_features // 4)
        inputs = (in_features,) + widths[:2]
        self.norms = nn.ModuleList(make_norm(c, norm) for c in inputs)
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1, bias=False)
                                   for i, o in zip(inputs, widths))
        self.shortcut = None
        if in_features != out_features:
            self.shortcut = nn.Sequential(make_norm(in_features, norm), nn.ReLU(),
                                          nn.Conv2d(in_features, out_features, 1, bias=False))

    def forward(self, x):
        outputs, out = [], x
        for norm, conv in zip(self.norms, self.convs):
            out = conv(F.relu(norm(out)))
            outputs.append(out)
        residual = x if self.shortcut is None else self.shortcut(x)
        return torch.cat(outputs, dim=1) + residual


class ResidualHourglass(nn.Module):
    """Newell et al.'s hourglass, as FAN stacks it: at each of ``depth`` levels an upper branch
    (a block at this resolution) plus a lower branch (2x2 average pooling, a block, the next level
    or a block at the bottom, a block, 2x nearest upsampling); all levels ``features`` wide.
    Input sides must be divisible by ``2^depth``."""

    def __init__(self, features, depth=4, norm="batch", block=HierarchicalBlock):
        super().__init__()
        self.upper = block(features, features, norm=norm)
        self.down = block(features, features, norm=norm)
        self.inner = ResidualHourglass(features, depth - 1, norm, block) if depth > 1 \
            else block(features, features, norm=norm)
        self.up = block(features, features, norm=norm)

    def forward(self, x):
        low = self.up(self.inner(self.down(F.avg_pool2d(x, 2))))
        return self.upper(x) + F.interpolate(low, scale_factor=2, mode="nearest")
