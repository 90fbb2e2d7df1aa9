"""3D dense motion network of face-vid2vid (Wang et al. 2021): K 3D keypoint motions -> one 3D
flow w_{S<-D} over the source feature volume, plus an occlusion map.

Motion slots, in this order (the channel order of ``mask``):

  0        background, the identity flow T(z) = z, heatmap = zero volume
  1 .. K   T_k(z) = x_S,k + J_S,k J_D,k^-1 (z - x_D,k) (translation only without Jacobians);
           heatmap = gaussian(x_D,k) - gaussian(x_S,k) over the volume (variance 0.01)

The source volume is first compressed (1x1x1 conv -> batch norm -> ReLU to ``compress``
channels) and warped by every slot's flow. A 3D hourglass over [heatmap, warped volume] of all
slots predicts softmax masks (7x7x7 head); the flow is the mask-weighted sum of the slots' flows.
The occlusion map is a sigmoid 7x7 2D convolution of the hourglass output with depth folded into
channels.
"""
import torch
from torch import nn

from modules.blocks_3d import Hourglass3d, make_norm_3d
from modules.coords import warp_volume
from modules.util import KP_VARIANCE, identity_flows, keypoint_heatmap_differences, \
    sparse_affine_flows


class DenseMotionNetwork3d(nn.Module):
    """``forward(feature, kp_driving, kp_source)`` on a source volume ``B x C x D x H x W``.

    Returns a dict:
      deformation      ``B x D x H x W x 3``     dense backward 3D flow
      mask             ``B x (K+1) x D x H x W`` softmax masks
      sparse_flows     ``B x (K+1) x D x H x W x 3``
      heatmaps         ``B x (K+1) x 1 x D x H x W``
      sparse_deformed  ``B x (K+1) x compress x D x H x W``
      occlusion_map    ``B x 1 x H x W`` (when ``estimate_occlusion_map``)

    Arguments mirror the reference ``dense_motion_params`` (+ ``num_kp``, ``feature_channel``,
    ``estimate_occlusion_map``). ``align_corners`` is the sampling convention of the volume warp
    (``modules/coords.py``): False, ``grid_sample``'s default, is what the reference samples with.
    """

    def __init__(self, num_kp=15, feature_channel=32, block_expansion=32, max_features=1024,
                 num_blocks=5, reshape_depth=16, compress=4, estimate_occlusion_map=True,
                 kp_variance=KP_VARIANCE, align_corners=False):
        super().__init__()
        self.num_kp = num_kp
        self.kp_variance = kp_variance
        self.align_corners = align_corners
        self.hourglass = Hourglass3d(block_expansion, (num_kp + 1) * (compress + 1), num_blocks,
                                     max_features)
        self.mask = nn.Conv3d(self.hourglass.out_filters, num_kp + 1, kernel_size=7, padding=3)
        self.compress = nn.Conv3d(feature_channel, compress, kernel_size=1)
        self.norm = make_norm_3d(compress)
        self.occlusion = None
        if estimate_occlusion_map:
            self.occlusion = nn.Conv2d(self.hourglass.out_filters * reshape_depth, 1,
                                       kernel_size=7, padding=3)

    def compress_feature(self, feature):
        return torch.relu(self.norm(self.compress(feature)))

    def sparse_motions(self, feature, kp_driving, kp_source):
        """Flows of the background + K keypoint slots: ``B x (K+1) x D x H x W x 3``."""
        size = feature.shape[2:]
        background = identity_flows(feature.shape[0], size, feature.dtype, feature.device)
        return torch.cat([background, sparse_affine_flows(kp_driving, kp_source, size)], dim=1)

    def deform_feature(self, feature, flows):
        """The volume warped by each slot's flow: ``B x (K+1) x C x D x H x W``."""
        batch, slots = flows.shape[:2]
        repeated = feature[:, None].expand(-1, slots, *feature.shape[1:]).flatten(0, 1)
        deformed = warp_volume(repeated, flows.flatten(0, 1), align_corners=self.align_corners)
        return deformed.view(batch, slots, *feature.shape[1:])

    def heatmap_representation(self, feature, kp_driving, kp_source):
        """Zero volume (background), then per-keypoint gaussian differences:
        ``B x (K+1) x 1 x D x H x W``."""
        size = feature.shape[2:]
        heatmaps = keypoint_heatmap_differences(kp_driving, kp_source, size, self.kp_variance)
        background = heatmaps.new_zeros(heatmaps.shape[0], 1, *size)
        return torch.cat([background, heatmaps], dim=1)[:, :, None]

    def forward(self, feature, kp_driving, kp_source):
        batch, _, depth, height, width = feature.shape
        feature = self.compress_feature(feature)
        flows = self.sparse_motions(feature, kp_driving, kp_source)
        deformed = self.deform_feature(feature, flows)
        heatmaps = self.heatmap_representation(feature, kp_driving, kp_source)
        inputs = torch.cat([heatmaps, deformed], dim=2).view(batch, -1, depth, height, width)
        prediction = self.hourglass(inputs)
        mask = torch.softmax(self.mask(prediction), dim=1)
        deformation = (mask[..., None] * flows).sum(dim=1)
        result = {"deformation": deformation, "mask": mask, "sparse_flows": flows,
                  "heatmaps": heatmaps, "sparse_deformed": deformed}
        if self.occlusion is not None:
            folded = prediction.reshape(batch, -1, height, width)
            result["occlusion_map"] = torch.sigmoid(self.occlusion(folded))
        return result
