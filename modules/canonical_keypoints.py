"""Canonical 3D keypoint detector of face-vid2vid (Wang et al. 2021), also MMFA's x_c.

A 2D encoder turns the (downsampled) image into a feature map whose channels are reshaped into a
shallow volume (``reshape_channel = C * reshape_depth``); a 3D decoder of up blocks brings it
back to the input's height and width. A 3x3x3 head predicts one heatmap per keypoint; its spatial
softmax (at ``temperature``) weights the voxel-centre coordinates, giving the canonical keypoints
x_c = sum_z softmax(h)(z) * z, in normalized (x, y, z) coordinates.
"""
import torch
import torch.nn.functional as F
from torch import nn

from modules.blocks import DownBlock2d, level_channels
from modules.blocks_3d import UpBlock3d
from modules.coords import make_coordinate_grid_3d
from modules.precision import full_precision
from modules.util import AntiAliasDownsample


class KeypointHourglass3d(nn.Module):
    """2D down blocks -> 1x1 conv -> reshape to ``reshape_depth`` -> 3D up blocks (no skips).

    Output: ``B x out_filters x reshape_depth x H x W`` for an ``H x W`` input.
    """

    def __init__(self, block_expansion, in_features, reshape_features, reshape_depth,
                 num_blocks=3, max_features=256):
        super().__init__()
        channels = [in_features] + [level_channels(block_expansion, i + 1, max_features)
                                    for i in range(num_blocks)]
        if reshape_features != channels[-1] * reshape_depth:
            raise ValueError(f"reshape_channel ({reshape_features}) must equal the encoder's last "
                             f"width times reshape_depth ({channels[-1]} * {reshape_depth}): "
                             f"the 3D decoder starts from that many channels")
        self.down_blocks = nn.ModuleList(DownBlock2d(channels[i], channels[i + 1])
                                         for i in range(num_blocks))
        self.conv = nn.Conv2d(channels[-1], reshape_features, kernel_size=1)
        up_channels = [level_channels(block_expansion, level, max_features)
                       for level in range(num_blocks, -1, -1)]
        self.up_blocks = nn.ModuleList(UpBlock3d(up_channels[i], up_channels[i + 1])
                                       for i in range(num_blocks))
        self.reshape_depth = reshape_depth
        self.out_filters = up_channels[-1]

    def forward(self, x):
        for block in self.down_blocks:
            x = block(x)
        x = self.conv(x)
        batch, channels, height, width = x.shape
        x = x.view(batch, channels // self.reshape_depth, self.reshape_depth, height, width)
        for block in self.up_blocks:
            x = block(x)
        return x


class CanonicalKeypointDetector(nn.Module):
    """Image -> K canonical 3D keypoints ``{'value': B x K x 3}`` (+ ``'jacobian': B x K x 3 x 3``).

    Constructor arguments mirror the reference config (``kp_detector_params`` + ``num_kp``,
    ``image_channel``). ``estimate_jacobian`` adds a 3x3x3 head of 9 numbers per keypoint (or one
    shared map with ``single_jacobian_map``) averaged under the heatmaps, started at the identity
    like FOMM's; face-vid2vid's configs leave it off. ``scale_factor`` != 1 first shrinks the image
    with the reference's Gaussian subsampling (buffer ``down.weight``).
    """

    def __init__(self, num_kp=15, image_channel=3, block_expansion=32, max_features=1024,
                 num_blocks=5, reshape_channel=16384, reshape_depth=16, temperature=0.1,
                 scale_factor=0.25, estimate_jacobian=False, single_jacobian_map=False):
        super().__init__()
        self.num_kp = num_kp
        self.temperature = temperature
        self.predictor = KeypointHourglass3d(block_expansion, image_channel, reshape_channel,
                                             reshape_depth, num_blocks, max_features)
        self.kp = nn.Conv3d(self.predictor.out_filters, num_kp, kernel_size=3, padding=1)
        self.jacobian = None
        if estimate_jacobian:
            self.num_jacobian_maps = 1 if single_jacobian_map else num_kp
            self.jacobian = nn.Conv3d(self.predictor.out_filters, 9 * self.num_jacobian_maps,
                                      kernel_size=3, padding=1)
            nn.init.zeros_(self.jacobian.weight)
            with torch.no_grad():
                self.jacobian.bias.copy_(torch.eye(3).flatten().repeat(self.num_jacobian_maps))
        self.down = AntiAliasDownsample(scale_factor, channels=image_channel) \
            if scale_factor != 1 else None

    @full_precision   # softmax at a low temperature and coordinates (modules/precision.py)
    def heatmaps(self, features):
        """Spatial softmax of the head's logits at ``temperature``: ``B x K x D x H x W``."""
        logits = self.kp(features)
        weights = F.softmax(logits.flatten(2) / self.temperature, dim=2)
        return weights.view(logits.shape)

    @staticmethod
    @full_precision
    def heatmap_means(heatmaps):
        """Expected normalized (x, y, z) coordinate under each heatmap: ``B x K x 3``."""
        grid = make_coordinate_grid_3d(*heatmaps.shape[-3:], dtype=heatmaps.dtype,
                                       device=heatmaps.device)
        return (heatmaps[..., None] * grid).sum(dim=(2, 3, 4))

    def jacobians(self, features, heatmaps):
        """Heatmap-weighted average of the Jacobian head: ``B x K x 3 x 3``."""
        maps = self.jacobian(features)
        batch, _, depth, height, width = maps.shape
        maps = maps.view(batch, self.num_jacobian_maps, 9, depth, height, width)
        weighted = (heatmaps[:, :, None] * maps).flatten(3).sum(-1)       # B x K x 9
        return weighted.view(batch, self.num_kp, 3, 3)

    def forward(self, image):
        if self.down is not None:
            image = self.down(image)
        features = self.predictor(image)
        heatmaps = self.heatmaps(features)
        keypoints = {"value": self.heatmap_means(heatmaps)}
        if self.jacobian is not None:
            keypoints["jacobian"] = self.jacobians(features, heatmaps)
        return keypoints
