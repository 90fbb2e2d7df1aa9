"""Unsupervised keypoint detector (FOMM; SAFA section 4.2): K keypoints with local Jacobians."""
import torch
import torch.nn.functional as F
from torch import nn

from modules.blocks import Hourglass
from modules.util import AntiAliasDownsample, heatmap_means


class KPDetector(nn.Module):
    """An hourglass predicts K heatmaps; each keypoint is its heatmap's mean coordinate.

    The image is first shrunk by ``scale_factor`` (anti-aliased). Heatmaps are a spatial softmax
    of 7x7-conv logits divided by ``temperature``. With ``estimate_jacobian`` a second 7x7 head
    predicts 4 numbers per keypoint and pixel (or one shared set with ``single_jacobian_map``);
    the keypoint's Jacobian is their heatmap-weighted average. That head starts at weight 0, bias
    identity, so every Jacobian is exactly the identity at initialization.

    Returns ``{'value': B x K x 2, 'jacobian': B x K x 2 x 2}`` (no 'jacobian' without it).
    """

    def __init__(self, num_kp=10, num_channels=3, block_expansion=32, max_features=1024,
                 num_blocks=5, temperature=0.1, estimate_jacobian=True, scale_factor=0.25,
                 single_jacobian_map=False, norm="batch"):
        super().__init__()
        self.num_kp = num_kp
        self.temperature = temperature
        self.downsample = AntiAliasDownsample(scale_factor)
        self.predictor = Hourglass(block_expansion, num_channels, num_blocks, max_features, norm)
        self.heatmap_head = nn.Conv2d(self.predictor.out_filters, num_kp, kernel_size=7, padding=3)
        self.jacobian_head = None
        if estimate_jacobian:
            self.num_jacobian_maps = 1 if single_jacobian_map else num_kp
            self.jacobian_head = nn.Conv2d(self.predictor.out_filters, 4 * self.num_jacobian_maps,
                                           kernel_size=7, padding=3)
            self.reset_jacobian_head()

    def reset_jacobian_head(self):
        """Weight 0, bias = flattened 2x2 identity per map: every Jacobian starts as I."""
        nn.init.zeros_(self.jacobian_head.weight)
        identity = torch.tensor([1.0, 0.0, 0.0, 1.0])
        with torch.no_grad():
            self.jacobian_head.bias.copy_(identity.repeat(self.num_jacobian_maps))

    def heatmaps(self, features):
        """Spatial softmax of the heatmap logits at ``temperature``: ``B x K x h x w``, sums to 1."""
        logits = self.heatmap_head(features)
        batch, kps, height, width = logits.shape
        weights = F.softmax(logits.flatten(2) / self.temperature, dim=2)
        return weights.view(batch, kps, height, width)

    @staticmethod
    def heatmap_means(heatmaps):
        """Expected normalized (x, y) coordinate under each heatmap: ``B x K x 2``."""
        return heatmap_means(heatmaps)

    def jacobians(self, features, heatmaps):
        """Heatmap-weighted average of the Jacobian head: ``B x K x 2 x 2``."""
        maps = self.jacobian_head(features)
        batch, _, height, width = maps.shape
        maps = maps.view(batch, self.num_jacobian_maps, 4, height, width)
        if self.num_jacobian_maps == 1:
            maps = maps.expand(-1, self.num_kp, -1, -1, -1)
        jacobian = torch.einsum("bkhw,bkchw->bkc", heatmaps, maps)
        return jacobian.view(batch, self.num_kp, 2, 2)

    def forward(self, image):
        features = self.predictor(self.downsample(image))
        heatmaps = self.heatmaps(features)
        keypoints = {"value": self.heatmap_means(heatmaps)}
        if self.jacobian_head is not None:
            keypoints["jacobian"] = self.jacobians(features, heatmaps)
        return keypoints
