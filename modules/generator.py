"""Occlusion-aware generator (FOMM; the base of SAFA's U-Net generator, section 4.4).

The forward pass is a chain of small steps so a model can replace one of them:

    motion   = estimate_motion(source, kp_driving, kp_source, extra_motions)   dense motion net
    features = encode(source)                      [f_0 (full res), f_1, ..., f_n (bottleneck)]
    warped   = warp_features(features, motion)     every level warped by the dense flow; occluded
                                                   by ``occlude`` (FOMM: multiplied by O)
    x        = bottleneck(warped[-1])              residual blocks
    image    = decode(x, warped[:-1])              up blocks (+ U-Net skips), 7x7 conv, sigmoid

SAFA subclasses this: it warps without occlusion at the top level, applies GADE with O_g, runs
``bottleneck`` then contextual attention with O_ca, and decodes with the warped skips
(``skip_connections=True``).
"""
import torch
from torch import nn

from modules.blocks import DownBlock2d, ResBlock2d, SameBlock2d, UpBlock2d, level_channels
from modules.coords import REFERENCE_ALIGN_CORNERS, resize_map, warp
from modules.dense_motion import DenseMotionNetwork


class OcclusionAwareGenerator(nn.Module):
    """Source image + keypoints -> image of the source in the driving pose.

    ``skip_connections``: decode with the warped (and occluded) encoder features of each level
    concatenated after every up block (U-Net, as in SAFA); FOMM decodes without them.
    ``dense_motion_params``: keyword arguments of :class:`DenseMotionNetwork` (None: no motion,
    the source features pass unwarped).
    ``align_corners``: sampling convention of every warp and resize (``modules.coords``; default
    the reference code's), also given to the dense motion network unless its params set it.
    """

    def __init__(self, num_channels=3, num_kp=10, block_expansion=64, max_features=512,
                 num_down_blocks=2, num_bottleneck_blocks=6, dense_motion_params=None,
                 skip_connections=False, norm="batch", align_corners=REFERENCE_ALIGN_CORNERS):
        super().__init__()
        self.align_corners = align_corners
        self.num_down_blocks = num_down_blocks
        self.skip_connections = skip_connections
        self.dense_motion_network = None
        if dense_motion_params is not None:
            dense_motion_params = dict({"align_corners": align_corners}, **dense_motion_params)
            self.dense_motion_network = DenseMotionNetwork(num_kp=num_kp, num_channels=num_channels,
                                                           **dense_motion_params)
        channels = [level_channels(block_expansion, i, max_features)
                    for i in range(num_down_blocks + 1)]
        self.channels = channels                           # channels of f_0 .. f_n
        self.input_block = SameBlock2d(num_channels, channels[0], kernel_size=7, padding=3,
                                       norm=norm)
        self.down_blocks = nn.ModuleList(DownBlock2d(channels[i], channels[i + 1], norm=norm)
                                         for i in range(num_down_blocks))
        self.bottleneck_blocks = nn.Sequential(*[ResBlock2d(channels[-1], norm=norm)
                                                 for _ in range(num_bottleneck_blocks)])
        self.up_blocks = nn.ModuleList(
            UpBlock2d(self.decoder_in_channels(level), channels[level - 1], norm=norm)
            for level in range(num_down_blocks, 0, -1))
        self.output_conv = nn.Conv2d(self.decoder_in_channels(0), num_channels, kernel_size=7,
                                     padding=3)

    def decoder_in_channels(self, level):
        """Input channels of the decoder stage that starts at encoder ``level``."""
        if level == self.num_down_blocks or not self.skip_connections:
            return self.channels[level]
        return 2 * self.channels[level]

    # ------------------------------------------------------------------ steps
    def estimate_motion(self, source_image, kp_driving, kp_source, extra_motions=None):
        if self.dense_motion_network is None:
            return {}
        return self.dense_motion_network(source_image, kp_driving=kp_driving, kp_source=kp_source,
                                         extra_motions=extra_motions)

    def encode(self, source_image):
        """Source features, finest first: ``[f_0 (H x W), f_1 (H/2), ..., f_n (bottleneck)]``."""
        features = [self.input_block(source_image)]
        for block in self.down_blocks:
            features.append(block(features[-1]))
        return features

    def warp_feature(self, feature, deformation):
        """One feature map warped by the dense flow (resized to the feature's resolution)."""
        return warp(feature, deformation, align_corners=self.align_corners)

    def occlude(self, feature, occlusion_map):
        """FOMM's use of the occlusion map: features multiplied by it (resized to fit)."""
        if occlusion_map is None:
            return feature
        return feature * resize_map(occlusion_map, feature.shape[-2:], self.align_corners)

    def warp_features(self, features, motion):
        """Warp (and occlude) the levels the decoder uses: all with skips, else only the top."""
        levels = range(len(features)) if self.skip_connections else [len(features) - 1]
        warped = list(features)
        if "deformation" not in motion:
            return warped
        for level in levels:
            moved = self.warp_feature(features[level], motion["deformation"])
            warped[level] = self.occlude(moved, motion.get("occlusion_map"))
        return warped

    def bottleneck(self, feature):
        return self.bottleneck_blocks(feature)

    def decode(self, feature, skips=None):
        """Up blocks from the bottleneck; with ``skip_connections`` concatenate ``skips[level]``."""
        out = feature
        for index, block in enumerate(self.up_blocks):
            out = block(out)
            level = self.num_down_blocks - 1 - index
            if self.skip_connections:
                out = torch.cat([out, skips[level]], dim=1)
        return torch.sigmoid(self.output_conv(out))

    # ------------------------------------------------------------------ forward
    def forward(self, source_image, kp_driving, kp_source, extra_motions=None,
                source_features=None):
        """``source_features``: ``encode(source_image)`` computed once for many driving frames."""
        motion = self.estimate_motion(source_image, kp_driving, kp_source, extra_motions)
        features = source_features if source_features is not None else self.encode(source_image)
        warped = self.warp_features(features, motion)
        prediction = self.decode(self.bottleneck(warped[-1]), warped[:-1])
        return self.outputs(source_image, motion, prediction)

    def outputs(self, source_image, motion, prediction):
        """The output dict: prediction plus the motion's maps and the source under the dense flow."""
        result = {"prediction": prediction}
        for key in ("mask", "sparse_deformed", "deformation", "occlusion_map", "occlusion_maps"):
            if key in motion:
                result[key] = motion[key]
        if "deformation" in motion:
            result["deformed"] = warp(source_image, motion["deformation"],
                                      align_corners=self.align_corners)
        return result
