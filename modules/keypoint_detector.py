"""Unsupervised keypoint detector (FOMM; SAFA section 4.2): K keypoints with local Jacobians."""
import torch
import torch.nn.functional as F
from torch import nn

from modules.blocks import Hourglass
from modules.precision import full_precision
from modules.util import AntiAliasDownsample, heatmap_means


class KPDetector(nn.Module):
    """An hourglass predicts K heatmaps; each keypoint is its heatmap's mean coordinate.

    The image is first shrunk by ``scale_factor`` (anti-aliased, :class:`AntiAliasDownsample`).
    Heatmaps are a spatial softmax of 7x7-conv logits divided by ``temperature``. With
    ``estimate_jacobian`` a second 7x7 head predicts 4 numbers per keypoint and pixel (or one
    shared set with ``single_jacobian_map``); the keypoint's Jacobian is their heatmap-weighted
    average. That head starts at weight 0, bias identity, so every Jacobian is exactly the identity
    at initialization.

    ``head_padding``: padding of the two 7x7 heads. 0 (default) is the reference network: the
    heads see only full 7x7 windows, so a 64x64 feature map gives 58x58 heatmaps whose grid spans
    [-1, 1] all the same (keypoints cannot sit in the outermost 3 pixels). 3 keeps the
    heatmaps at the feature resolution (same parameters, so the same weights load either way).

    ``forward`` returns ``{'value': B x K x 2, 'jacobian': B x K x 2 x 2}`` (no 'jacobian'
    without it); :meth:`detect` also returns the intermediate maps.
    """

    def __init__(self, num_kp=10, num_channels=3, block_expansion=32, max_features=1024,
                 num_blocks=5, temperature=0.1, estimate_jacobian=True, scale_factor=0.25,
                 single_jacobian_map=False, norm="batch", head_padding=0):
        super().__init__()
        self.num_kp = num_kp
        self.temperature = temperature
        self.downsample = AntiAliasDownsample(scale_factor, channels=num_channels)
        self.predictor = Hourglass(block_expansion, num_channels, num_blocks, max_features, norm)
        self.heatmap_head = nn.Conv2d(self.predictor.out_filters, num_kp, kernel_size=7,
                                      padding=head_padding)
        self.jacobian_head = None
        if estimate_jacobian:
            self.num_jacobian_maps = 1 if single_jacobian_map else num_kp
            self.jacobian_head = nn.Conv2d(self.predictor.out_filters, 4 * self.num_jacobian_maps,
                                           kernel_size=7, padding=head_padding)
            self.reset_jacobian_head()

    def reset_jacobian_head(self):
        """Weight 0, bias = flattened 2x2 identity per map: every Jacobian starts as I."""
        nn.init.zeros_(self.jacobian_head.weight)
        identity = torch.tensor([1.0, 0.0, 0.0, 1.0])
        with torch.no_grad():
            self.jacobian_head.bias.copy_(identity.repeat(self.num_jacobian_maps))

    def heatmaps(self, features):
        """Heatmaps of the predictor's features: ``B x K x h x w``, each sums to 1."""
        return self.softmax_heatmaps(self.heatmap_head(features))

    def softmax_heatmaps(self, logits):
        """Spatial softmax of the heatmap logits at ``temperature``: ``B x K x h x w``, sums to 1."""
        batch, kps, height, width = logits.shape
        weights = F.softmax(logits.flatten(2) / self.temperature, dim=2)
        return weights.view(batch, kps, height, width)

    @staticmethod
    def heatmap_means(heatmaps):
        """Expected normalized (x, y) coordinate under each heatmap: ``B x K x 2``."""
        return heatmap_means(heatmaps)

    def jacobians(self, features, heatmaps):
        """Heatmap-weighted average of the Jacobian head: ``B x K x 2 x 2``."""
        return self.average_jacobians(self.jacobian_head(features), heatmaps)

    def average_jacobians(self, jacobian_map, heatmaps):
        """Heatmap-weighted average of the Jacobian head's maps: ``B x K x 2 x 2``."""
        batch, _, height, width = jacobian_map.shape
        maps = jacobian_map.reshape(batch, self.num_jacobian_maps, 4, height, width)
        if self.num_jacobian_maps == 1:
            maps = maps.expand(-1, self.num_kp, -1, -1, -1)
        jacobian = (heatmaps[:, :, None] * maps).flatten(3).sum(dim=-1)     # B x K x 4
        return jacobian.view(batch, self.num_kp, 2, 2)

    def detect(self, image):
        """Keypoints plus the intermediate maps: ``downsampled_input``, ``heatmap_logits``,
        ``heatmaps`` and (with Jacobians) ``jacobian_map``."""
        downsampled = self.downsample(image)
        result = self.heads(self.predictor(downsampled))
        result["downsampled_input"] = downsampled
        return result

    # The heads run in float32 under autocast (modules/precision.py): the softmax divides the
    # logits by the temperature (0.1), which turns the 16-bit rounding of a logit (up to 1/64 at
    # 4) into a few percent of a heatmap weight, and the keypoints are coordinates. Cheap: K and
    # 4K output channels.
    @full_precision
    def heads(self, features):
        """Keypoints and maps from the predictor's features: ``value``, ``heatmap_logits``,
        ``heatmaps`` and (with Jacobians) ``jacobian_map``, ``jacobian``."""
        logits = self.heatmap_head(features)
        heatmaps = self.softmax_heatmaps(logits)
        result = {"value": self.heatmap_means(heatmaps), "heatmap_logits": logits,
                  "heatmaps": heatmaps}
        if self.jacobian_head is not None:
            result["jacobian_map"] = self.jacobian_head(features)
            result["jacobian"] = self.average_jacobians(result["jacobian_map"], heatmaps)
        return result

    def forward(self, image):
        detected = self.detect(image)
        return {key: detected[key] for key in ("value", "jacobian") if key in detected}
