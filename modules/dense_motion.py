"""Dense motion network (FOMM; SAFA section 4.3): fuse sparse motions into one dense flow.

Motion slots, in this order (the channel order of ``mask`` and ``sparse_deformed``):

  0          background, the identity flow T(z) = z, heatmap = zero map          (M_b)
  1 .. K     the K local affine motions of eq. 9, heatmaps H_k of eq. 10        (M_k)
  K+1 ..     extra motions given by the caller, e.g. SAFA's 3D face slot with
             flow T_{S<-D,3D}, deformed image I_r and heatmap H_3D (eq. 11)      (M_3D)

An hourglass over [heatmap, deformed source] of every slot predicts one softmax mask per slot
and ``num_occlusion_maps`` sigmoid occlusion maps (FOMM 1; SAFA 2: O_g, O_ca). The dense flow is
the mask-weighted sum of the slots' flows, eq. 12.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from modules.blocks import Hourglass
from modules.coords import REFERENCE_ALIGN_CORNERS, make_coordinate_grid, resize_map, warp
from modules.precision import full_precision
from modules.util import (KP_VARIANCE, AntiAliasDownsample, identity_flows,
                          keypoint_heatmap_differences, sparse_affine_flows)


@dataclass
class ExtraMotion:
    """One caller-provided motion slot of the dense motion network (any resolution).

    flow:     ``B x H x W x 2`` backward flow into the source (normalized coordinates). It must be
              a valid sampling grid everywhere: fill pixels the motion does not cover with the
              identity grid (``coords.make_coordinate_grid``). It is brought to the working
              resolution as a displacement: ``flow - grid`` is shrunk like the images (anti-aliased)
              and the working resolution's identity grid added back (SAFA's 3D motion field).
    heatmap:  ``B x 1 x H x W`` (or ``B x H x W``): where this motion happens (SAFA: H_3D, eq. 11).
    deformed: ``B x C x H x W`` source image under this motion (SAFA: the rendered I_r); None
              means "warp the source with ``flow``".
    """
    flow: torch.Tensor
    heatmap: torch.Tensor
    deformed: Optional[torch.Tensor] = None


class DenseMotionNetwork(nn.Module):
    """Masks over 1 background + K keypoint + ``num_extra_motions`` caller slots; occlusion maps.

    ``forward(source_image, kp_driving, kp_source, extra_motions=None)`` returns a dict:
      deformation      ``B x h x w x 2``      dense backward flow (eq. 12), h, w = scale_factor * H, W
      mask             ``B x N x h x w``      softmax masks, N = 1 + K + num_extra_motions
      sparse_flows     ``B x N x h x w x 2``  the slots' flows
      sparse_deformed  ``B x N x C x h x w``  the source under each slot's flow
      heatmaps         ``B x N x 1 x h x w``  the slots' heatmaps (zero for the background)
      occlusion_maps   ``B x num_occlusion_maps x h x w`` (only when num_occlusion_maps > 0)
      occlusion_map    ``B x 1 x h x w``      the first occlusion map (FOMM's single one)
    """

    def __init__(self, num_kp=10, num_channels=3, block_expansion=64, max_features=1024,
                 num_blocks=5, scale_factor=0.25, num_occlusion_maps=1, num_extra_motions=0,
                 kp_variance=KP_VARIANCE, norm="batch", align_corners=REFERENCE_ALIGN_CORNERS,
                 downsample_method="gaussian_subsample"):
        super().__init__()
        self.align_corners = align_corners
        self.num_kp = num_kp
        self.num_extra_motions = num_extra_motions
        self.num_motions = 1 + num_kp + num_extra_motions
        self.kp_variance = kp_variance
        self.downsample = AntiAliasDownsample(scale_factor, channels=num_channels,
                                              method=downsample_method, align_corners=align_corners)
        self.flow_downsample = None          # extra motions' displacements (2 channels, x and y)
        if num_extra_motions:
            self.flow_downsample = AntiAliasDownsample(scale_factor, channels=2,
                                                       method=downsample_method,
                                                       align_corners=align_corners)
        in_features = self.num_motions * (num_channels + 1)   # per slot: heatmap + deformed source
        self.hourglass = Hourglass(block_expansion, in_features, num_blocks, max_features, norm)
        self.mask_head = nn.Conv2d(self.hourglass.out_filters, self.num_motions, kernel_size=7,
                                   padding=3)
        self.occlusion_heads = nn.ModuleList(
            nn.Conv2d(self.hourglass.out_filters, 1, kernel_size=7, padding=3)
            for _ in range(num_occlusion_maps))

    # ------------------------------------------------------------------ motion slots
    def keypoint_slots(self, source, kp_driving, kp_source):
        """Flows, heatmaps and deformed sources of the background + K keypoint slots."""
        batch, _, height, width = source.shape
        size = (height, width)
        flows = torch.cat([identity_flows(batch, size, source.dtype, source.device),
                           sparse_affine_flows(kp_driving, kp_source, size)], dim=1)
        kp_heatmaps = keypoint_heatmap_differences(kp_driving, kp_source, size, self.kp_variance)
        heatmaps = torch.cat([kp_heatmaps.new_zeros(batch, 1, height, width), kp_heatmaps], dim=1)
        return flows, heatmaps[:, :, None], self.deform_source(source, flows)

    def deform_source(self, source, flows):
        """The source warped by each flow: ``B x N x C x h x w``."""
        batch, slots = flows.shape[:2]
        repeated = source[:, None].expand(-1, slots, -1, -1, -1).flatten(0, 1)
        deformed = warp(repeated, flows.flatten(0, 1), align_corners=self.align_corners)
        return deformed.view(batch, slots, *source.shape[1:])

    def extra_slot(self, source_image, motion, size):
        """One caller motion brought to the working resolution ``size``."""
        flow = self.resize_extra_flow(motion.flow, size)
        deformed = motion.deformed
        if deformed is None:
            deformed = warp(source_image, motion.flow, align_corners=self.align_corners)
        heatmap = motion.heatmap if motion.heatmap.dim() == 4 else motion.heatmap[:, None]
        if heatmap.shape[1] != 1:
            raise ValueError(f"an extra motion's heatmap must have 1 channel, got {heatmap.shape}")
        return flow, self.to_size(heatmap, size), self.to_size(deformed, size)

    def resize_extra_flow(self, flow, size):
        """A caller flow at ``size``: its displacement from the identity shrunk, the identity
        grid of ``size`` added back."""
        if tuple(flow.shape[1:3]) == tuple(size):
            return flow
        grid = make_coordinate_grid(*flow.shape[1:3], dtype=flow.dtype, device=flow.device)
        displacement = (flow - grid).permute(0, 3, 1, 2)
        displacement = self.to_size(displacement, size, self.flow_downsample)
        return displacement.permute(0, 2, 3, 1) + make_coordinate_grid(
            *size, dtype=flow.dtype, device=flow.device)

    def to_size(self, image, size, downsample=None):
        """``image`` at ``size``: anti-aliased shrinking from the source's resolution, else
        bilinear resizing."""
        if tuple(image.shape[-2:]) == tuple(size):
            return image
        shrunk = (downsample if downsample is not None else self.downsample)(image)
        if tuple(shrunk.shape[-2:]) == tuple(size):
            return shrunk
        return resize_map(image, size, self.align_corners)

    def gather_slots(self, source_image, kp_driving, kp_source, extra_motions):
        """All slots' ``(flows, heatmaps, deformed)`` at the working resolution."""
        extra_motions = list(extra_motions or [])
        if len(extra_motions) != self.num_extra_motions:
            raise ValueError(f"this dense motion network was built for {self.num_extra_motions} "
                             f"extra motion(s) (num_extra_motions) but got {len(extra_motions)}")
        source = self.downsample(source_image)
        flows, heatmaps, deformed = self.keypoint_slots(source, kp_driving, kp_source)
        if extra_motions:
            extras = [self.extra_slot(source_image, m, source.shape[-2:]) for m in extra_motions]
            flows = torch.cat([flows] + [flow[:, None] for flow, _, _ in extras], dim=1)
            heatmaps = torch.cat([heatmaps] + [h[:, None] for _, h, _ in extras], dim=1)
            deformed = torch.cat([deformed] + [d[:, None] for _, _, d in extras], dim=1)
        return flows, heatmaps, deformed

    # ------------------------------------------------------------------ prediction
    # Float32 under autocast (modules/precision.py): the dense flow is a coordinate, the masks'
    # weighted sum of the slots' flows, eq. 12; 16-bit masks would move it by up to a pixel.
    @full_precision
    def combine(self, features, flows):
        """Softmax masks over the slots and the dense flow they weight, eq. 12."""
        mask = F.softmax(self.mask_head(features), dim=1)                   # M_b, M_k, (M_3D)
        return mask, (mask[..., None] * flows).sum(dim=1)                   # eq. 12

    def forward(self, source_image, kp_driving, kp_source, extra_motions=None):
        flows, heatmaps, deformed = self.gather_slots(source_image, kp_driving, kp_source,
                                                      extra_motions)
        batch, slots, _, height, width = deformed.shape
        features = self.hourglass(torch.cat([heatmaps, deformed], dim=2).view(batch, -1, height,
                                                                              width))
        mask, deformation = self.combine(features, flows)
        result = {"deformation": deformation, "mask": mask, "sparse_flows": flows,
                  "sparse_deformed": deformed, "heatmaps": heatmaps}
        if len(self.occlusion_heads):
            maps = torch.cat([torch.sigmoid(head(features)) for head in self.occlusion_heads], 1)
            result["occlusion_maps"] = maps
            result["occlusion_map"] = maps[:, :1]
        return result
