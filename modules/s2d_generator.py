"""Image generation network of the sparse-to-dense model (section 3.1, eq. 1-2, Fig. 1).

The source is warped by the dense motion, E = f_w^b(S_I, F) (eq. 1); E concatenated with the
motion goes through FOMM's generator architecture (``modules.generator``: 7x7 input block, down
blocks, residual bottleneck, up blocks, 7x7 output), whose output here is a residual image R and a
mask M (both sigmoid), and

    T = E * (1 - M) + R * M                                                    (eq. 2)

The motion enters as its displacement ``F - identity`` (two channels: how far each pixel moves;
the paper concatenates "the dense motion map"). ``use_motion_input=False`` feeds E alone, the
setting of the paper's Table 4 ablation.
"""
import torch
from torch import nn

from modules.blocks import SameBlock2d
from modules.coords import make_coordinate_grid, resize_flow, warp
from modules.generator import OcclusionAwareGenerator


class ResidualMaskGenerator(OcclusionAwareGenerator):
    """``forward(source_image B x C x H x W, deformation B x H x W x 2)`` -> ``{'prediction' T,
    'deformed' E, 'residual' R, 'mask' M}``."""

    def __init__(self, num_channels=3, block_expansion=64, max_features=512, num_down_blocks=2,
                 num_bottleneck_blocks=6, use_motion_input=True, norm="batch"):
        super().__init__(num_channels=num_channels, block_expansion=block_expansion,
                         max_features=max_features, num_down_blocks=num_down_blocks,
                         num_bottleneck_blocks=num_bottleneck_blocks, dense_motion_params=None,
                         skip_connections=False, norm=norm)
        self.use_motion_input = use_motion_input
        in_channels = num_channels + (2 if use_motion_input else 0)
        self.input_block = SameBlock2d(in_channels, self.channels[0], kernel_size=7, padding=3,
                                       norm=norm)
        self.output_conv = nn.Conv2d(self.decoder_in_channels(0), num_channels + 1,
                                     kernel_size=7, padding=3)            # R (C) and M (1)

    def forward(self, source_image, deformation):
        deformation = resize_flow(deformation, source_image.shape[2:])
        deformed = warp(source_image, deformation)                               # E, eq. 1
        inputs = deformed
        if self.use_motion_input:
            grid = make_coordinate_grid(*deformation.shape[1:3], dtype=deformation.dtype,
                                        device=deformation.device)
            motion = (deformation - grid[None]).permute(0, 3, 1, 2)
            inputs = torch.cat([deformed, motion.to(deformed.dtype)], dim=1)
        features = self.encode(inputs)
        output = self.decode(self.bottleneck(features[-1]))                      # sigmoid
        residual, mask = output[:, :-1], output[:, -1:]
        prediction = deformed * (1 - mask) + residual * mask                     # eq. 2
        return {"prediction": prediction, "deformed": deformed, "residual": residual,
                "mask": mask}


__all__ = ["ResidualMaskGenerator"]
