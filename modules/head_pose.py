"""Head pose and expression estimator of face-vid2vid (Wang et al. 2021): the network E.

A ResNet-style trunk of bottleneck blocks (widths 256 .. 2048, fixed as in the reference
re-implementation) pooled to one vector, then five linear heads:

  yaw, pitch, roll   ``B x num_bins`` logits over 3-degree bins (66 bins: -99 .. +96 degrees);
                     :func:`modules.keypoints_3d.bins_to_degrees` turns them into angles
  t                  ``B x 3``       translation
  exp                ``B x 3K``      expression deltas (reshape to ``B x K x 3``)

``block_expansion`` (the stem width), ``num_bins`` and ``num_kp`` are configurable as in the
reference; ``widths`` (the four stage widths, the reference's 256 .. 2048 by default) lets CPU
test configs shrink the trunk. Layer names follow what each head predicts; the reference names its yaw head
``fc_roll`` and its roll head ``fc_yaw``, which the checkpoint converter swaps
(``compat/facevid2vid.py``).
"""
import torch.nn.functional as F
from torch import nn

from modules.precision import full_precision

NUM_BINS = 66   # 3-degree bins of Hopenet's head-pose classifier
REFERENCE_WIDTHS = (256, 512, 1024, 2048)   # stage widths, fixed in the reference


class ResBottleneck(nn.Module):
    """1x1 (C -> C/4) -> 3x3 (stride) -> 1x1 (C/4 -> C), batch norm after each, ReLU between;
    the input (through a strided 1x1 conv + norm when ``stride`` != 1) is added before the final
    ReLU. Channels stay ``features``; only the resolution changes."""

    def __init__(self, features, stride=1):
        super().__init__()
        inner = features // 4
        self.conv1 = nn.Conv2d(features, inner, kernel_size=1)
        self.conv2 = nn.Conv2d(inner, inner, kernel_size=3, padding=1, stride=stride)
        self.conv3 = nn.Conv2d(inner, features, kernel_size=1)
        self.norm1 = nn.BatchNorm2d(inner)
        self.norm2 = nn.BatchNorm2d(inner)
        self.norm3 = nn.BatchNorm2d(features)
        self.skip = self.norm4 = None
        if stride != 1:
            self.skip = nn.Conv2d(features, features, kernel_size=1, stride=stride)
            self.norm4 = nn.BatchNorm2d(features)

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        out = F.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        shortcut = x if self.skip is None else self.norm4(self.skip(x))
        return F.relu(out + shortcut)


def bottleneck_stage(features, count, stride=1):
    """``count`` bottleneck blocks of ``features`` channels; the first one has ``stride``."""
    return nn.Sequential(*[ResBottleneck(features, stride if i == 0 else 1) for i in range(count)])


class HeadPoseEstimator(nn.Module):
    """Image -> ``{'yaw', 'pitch', 'roll': B x num_bins logits, 't': B x 3, 'exp': B x 3K}``.

    Trunk (channels x resolution for a 256 px input):
      7x7/2 conv (block_expansion) -> 3x3/2 max pool -> 1x1 conv 256 -> 3 bottlenecks (64 px)
      -> 1x1 conv 512 -> bottleneck /2 + 3 bottlenecks (32 px)
      -> 1x1 conv 1024 -> bottleneck /2 + 5 bottlenecks (16 px)
      -> 1x1 conv 2048 -> bottleneck /2 + 2 bottlenecks (8 px) -> global average pool.
    Every conv outside the bottlenecks is followed by batch norm and ReLU.
    """

    def __init__(self, num_kp=15, image_channel=3, block_expansion=64, num_bins=NUM_BINS,
                 widths=REFERENCE_WIDTHS):
        super().__init__()
        if len(widths) != 4 or any(w % 4 for w in widths):
            raise ValueError(f"head-pose estimator widths must be four multiples of 4 (the "
                             f"bottlenecks work at a quarter width), got {list(widths)}")
        w1, w2, w3, w4 = widths
        self.num_kp = num_kp
        self.conv1 = nn.Conv2d(image_channel, block_expansion, kernel_size=7, padding=3, stride=2)
        self.norm1 = nn.BatchNorm2d(block_expansion)
        self.conv2 = nn.Conv2d(block_expansion, w1, kernel_size=1)
        self.norm2 = nn.BatchNorm2d(w1)
        self.block1 = bottleneck_stage(w1, 3)
        self.conv3 = nn.Conv2d(w1, w2, kernel_size=1)
        self.norm3 = nn.BatchNorm2d(w2)
        self.block2 = ResBottleneck(w2, stride=2)
        self.block3 = bottleneck_stage(w2, 3)
        self.conv4 = nn.Conv2d(w2, w3, kernel_size=1)
        self.norm4 = nn.BatchNorm2d(w3)
        self.block4 = ResBottleneck(w3, stride=2)
        self.block5 = bottleneck_stage(w3, 5)
        self.conv5 = nn.Conv2d(w3, w4, kernel_size=1)
        self.norm5 = nn.BatchNorm2d(w4)
        self.block6 = ResBottleneck(w4, stride=2)
        self.block7 = bottleneck_stage(w4, 2)
        self.fc_yaw = nn.Linear(w4, num_bins)
        self.fc_pitch = nn.Linear(w4, num_bins)
        self.fc_roll = nn.Linear(w4, num_bins)
        self.fc_t = nn.Linear(w4, 3)
        self.fc_exp = nn.Linear(w4, 3 * num_kp)

    def features(self, image):
        """The pooled trunk feature, ``B x widths[-1]`` (2048)."""
        out = F.relu(self.norm1(self.conv1(image)))
        out = F.max_pool2d(out, kernel_size=3, stride=2, padding=1)
        out = self.block1(F.relu(self.norm2(self.conv2(out))))
        out = self.block3(self.block2(F.relu(self.norm3(self.conv3(out)))))
        out = self.block5(self.block4(F.relu(self.norm4(self.conv4(out)))))
        out = self.block7(self.block6(F.relu(self.norm5(self.conv5(out)))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    # Float32 under autocast (modules/precision.py): in bf16 the untrained estimator's angles
    # moved by several degrees and its translation by 40% (the keypoints follow them); kept
    # float32 until trained weights show bf16 is safe here. It is a small share of a step.
    @full_precision
    def forward(self, image):
        feature = self.features(image)
        return {"yaw": self.fc_yaw(feature), "pitch": self.fc_pitch(feature),
                "roll": self.fc_roll(feature), "t": self.fc_t(feature),
                "exp": self.fc_exp(feature)}
