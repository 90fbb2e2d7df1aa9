"""MMFA's scale and translation estimator (seed 004, section 3.2): image -> s and t of the scaled
orthographic keypoint transform x = s R x_c + t + delta.

The paper learns s and t with "a simple decoder" beside face-vid2vid-like estimators and takes
R from a frozen pose network; here the decoder is a linear head on the bottleneck trunk of the
expression encoder (``modules/expression_encoder.py``, its own weights). s = exp(head) keeps the
scale positive; the head starts at zero (s = 1, t = 0: the canonical keypoints as they are).
"""
import torch
from torch import nn

from modules.expression_encoder import BottleneckEncoder


class ScaleTranslationEstimator(nn.Module):
    """Image -> ``{'scale': B, 'translation': B x 3}``."""

    def __init__(self, num_channels=3, block_expansion=32, widths=(64, 128, 256, 256),
                 pool_size=4):
        super().__init__()
        self.trunk = BottleneckEncoder(num_channels, block_expansion, widths, pool_size)
        self.head = nn.Linear(self.trunk.out_features, 4)     # log s, t_x, t_y, t_z
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, image):
        out = self.head(self.trunk(image))
        return {"scale": torch.exp(out[:, 0]), "translation": out[:, 1:]}
