"""MMFA's expression encoder E_exp (seed 004, section 3.2 and appendix A.1): image -> a
d-dimensional expression feature epsilon.

    conv 7x7 / 2 + ReLU -> 3x3 / 2 max pool                      (image features)
    per stage: 1x1 conv + batch norm + ReLU to the stage width, then a strided
    ResBottleneck (Kim et al. 2018, the blocks of ``modules/head_pose.py``)   (downsizing)
    average pool to ``pool_size`` x ``pool_size``, reshape, linear -> d      (epsilon)

:class:`BottleneckEncoder` is the trunk without the linear layer; MMFA's scale and translation
estimator (``modules/scale_translation.py``) uses the same trunk. The paper reshapes the last
feature map as it is; the pooling makes the linear layer independent of the frame size (at
256 px with four stages the map is already 4 x 4, where pooling to 4 changes nothing).
"""
import torch.nn.functional as F
from torch import nn

from modules.head_pose import ResBottleneck


class BottleneckEncoder(nn.Module):
    """Image ``B x C x H x W`` -> flattened feature ``B x widths[-1] * pool_size^2``."""

    def __init__(self, num_channels=3, block_expansion=64, widths=(128, 256, 512, 512),
                 pool_size=4):
        super().__init__()
        if any(width % 4 for width in widths):
            raise ValueError(f"bottleneck widths must be multiples of 4, got {list(widths)}")
        self.first = nn.Conv2d(num_channels, block_expansion, kernel_size=7, stride=2, padding=3)
        stages, previous = [], block_expansion
        for width in widths:
            stages.append(nn.Sequential(nn.Conv2d(previous, width, kernel_size=1),
                                        nn.BatchNorm2d(width), nn.ReLU(),
                                        ResBottleneck(width, stride=2)))
            previous = width
        self.stages = nn.Sequential(*stages)
        self.pool_size = pool_size
        self.out_features = widths[-1] * pool_size ** 2

    def forward(self, image):
        out = F.max_pool2d(F.relu(self.first(image)), kernel_size=3, stride=2, padding=1)
        out = self.stages(out)
        return F.adaptive_avg_pool2d(out, self.pool_size).flatten(1)


class ExpressionEncoder(nn.Module):
    """Image -> expression feature epsilon ``B x feature_dim`` (eq. 4)."""

    def __init__(self, num_channels=3, feature_dim=128, block_expansion=64,
                 widths=(128, 256, 512, 512), pool_size=4):
        super().__init__()
        self.trunk = BottleneckEncoder(num_channels, block_expansion, widths, pool_size)
        self.linear = nn.Linear(self.trunk.out_features, feature_dim)
        self.feature_dim = feature_dim

    def forward(self, image):
        return self.linear(self.trunk(image))
