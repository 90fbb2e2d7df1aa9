"""SAFA's U-Net occlusion-aware generator (seed 000 section 4.4, Fig. 3).

FOMM's occlusion-aware generator with three changes: the dense motion network gets the 3D face
slot (T_{S<-D,3D}, H_3D and I_r) and two occlusion maps (O_g, O_ca); GADE modulates the warped
bottleneck features with the driving 3D geometry where O_g says the source is occluded; contextual
attention with O_ca plus a dilated branch follows the residual bottleneck; the decoder takes the
warped encoder features as U-Net skips.

The authors' public code differs from the paper in a few places. Each difference is a constructor
switch here (or in the layers it builds); the defaults follow the paper:

=====================  ==============================  =========================================
switch                 paper (default)                 authors' code
=====================  ==============================  =========================================
``condition_dim``      159: normalized FLAME codes     1280: the 3DMM encoder's MobileNet feature
``gade_params.norm``   'batch' (parameter-free norm)   'none' (the encoder output as it is)
``skip_connections``   True: warped skips concatenated False: the decoder sees no skips
``decoder_gade``       False                           True: a GADE with a learned per-channel
                                                       gate between norm and ReLU of every up block
``heatmap_3d``         'driving_minus_source' (eq. 11) 'source_minus_driving'
contextual attention   see ``modules.contextual_attention``: ``downsample``, ``similarity``,
                       ``propagation``, ``key_weighting``, ``overlap``, ``paste_back``,
                       ``map_marks_visible`` (``contextual_attention_params``)
=====================  ==============================  =========================================

The authors' GADE layers compute gamma = fc_1(c) where ours compute 1 + fc_gamma(c): the same
function family, converted exactly by moving 1 into the bias (``compat.checkpoints``).
"""
import torch
import torch.nn.functional as F
from torch import nn

from modules.blocks import UpBlock2d
from modules.contextual_attention import ContextualAttentionModule
from modules.coords import resize_map
from modules.dense_motion import ExtraMotion
from modules.generator import OcclusionAwareGenerator
from modules.norms import GADE

HEATMAP_3D_ORDERS = ("driving_minus_source", "source_minus_driving")


class ChannelGatedGADE(GADE):
    """GADE inside a decoder block (the authors' code): no normalization, and a learned gate per
    channel and pixel instead of O_g.

        G     = sigmoid(conv3x3(F))                     C channels: where to use the geometry
        F_out = (1 - G) * F + G * (gamma(c) * F + delta(c))

    (eq. 14 with the visibility O_g replaced by 1 - G).
    """

    def __init__(self, num_features, condition_dim):
        super().__init__(num_features, condition_dim, norm="none", gate="learned")
        self.gate_conv = nn.Conv2d(num_features, num_features, kernel_size=3, padding=1)

    def blend_weight(self, features, occlusion_map=None):
        return 1.0 - torch.sigmoid(self.gate_conv(features))        # weight of F, i.e. 1 - G


class GADEUpBlock2d(UpBlock2d):
    """2x nearest upsampling -> conv -> norm -> :class:`ChannelGatedGADE` -> ReLU."""

    def __init__(self, in_features, out_features, condition_dim, kernel_size=3, padding=1,
                 norm="batch"):
        super().__init__(in_features, out_features, kernel_size, padding, norm)
        self.gade = ChannelGatedGADE(out_features, condition_dim)

    def forward(self, x, condition):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return F.relu(self.gade(self.norm(self.conv(x)), condition))


class SAFAGenerator(OcclusionAwareGenerator):
    """U-Net occlusion-aware generator (section 4.4): encoder, warp, GADE with O_g, residual
    bottleneck, contextual attention with O_ca plus the dilated branch, decoder with warped skips.

    ``forward(source_image, kp_driving, kp_source, face3d=None, condition=None)``: ``face3d`` is
    the 3D face slot (``modules.face_maps.FaceMaps`` output): ``flow_3d`` (B x H x W x 2),
    ``I_r`` (B x 3 x H x W) and either the normal maps ``normal_source`` / ``normal_driving``
    (B x 3 x H x W, H_3D is taken from their z channels) or ``heatmap_3d`` directly;
    ``condition`` is GADE's condition (B x ``condition_dim``).
    """

    def __init__(self, num_channels=3, num_kp=10, use_3d_motion=True, use_contextual_attention=True,
                 use_gade=True, condition_dim=159, gade_params=None, contextual_attention_params=None,
                 dense_motion_params=None, skip_connections=True, decoder_gade=False,
                 heatmap_3d="driving_minus_source", **generator_params):
        if heatmap_3d not in HEATMAP_3D_ORDERS:
            raise ValueError(f"unknown heatmap_3d {heatmap_3d!r}; expected one of "
                             f"{HEATMAP_3D_ORDERS}")
        dense_motion_params = dict(dense_motion_params or {}, num_extra_motions=int(use_3d_motion),
                                   num_occlusion_maps=2 if use_contextual_attention else 1)
        super().__init__(num_channels, num_kp, dense_motion_params=dense_motion_params,
                         skip_connections=skip_connections, **generator_params)
        self.use_3d_motion = use_3d_motion
        self.heatmap_3d_order = heatmap_3d
        top = self.channels[-1]
        self.gade = GADE(top, condition_dim, **(gade_params or {})) if use_gade else None
        self.contextual_attention = ContextualAttentionModule(
            top, **(contextual_attention_params or {})) if use_contextual_attention else None
        self.decoder_gade = decoder_gade
        if decoder_gade:
            norm = generator_params.get("norm", "batch")
            self.up_blocks = nn.ModuleList(
                GADEUpBlock2d(block.conv.in_channels, block.conv.out_channels, condition_dim,
                              norm=norm) for block in self.up_blocks)

    def heatmap_3d(self, face3d):
        """H_3D: the difference of the normal maps' z channels (eq. 11), ``B x 1 x h x w``.

        The normal maps are first brought to the dense motion network's resolution (the same
        shrinking as its other inputs), then subtracted: the reference code's order of the two
        linear steps, so the numbers match it to the last bit.
        """
        if "normal_source" not in face3d:
            if self.heatmap_3d_order != "driving_minus_source":
                raise ValueError("heatmap_3d='source_minus_driving' needs the normal maps "
                                 "(face3d['normal_source'], face3d['normal_driving'])")
            return face3d["heatmap_3d"]
        network = self.dense_motion_network
        size = network.downsample.output_size(*face3d["normal_source"].shape[-2:])
        source_z = network.to_size(face3d["normal_source"], size)[:, 2:3]
        driving_z = network.to_size(face3d["normal_driving"], size)[:, 2:3]
        if self.heatmap_3d_order == "driving_minus_source":
            return driving_z - source_z
        return source_z - driving_z

    def decode(self, feature, skips=None, condition=None):
        """Up blocks (GADE-modulated with ``decoder_gade``), U-Net skips when enabled."""
        out = feature
        for index, block in enumerate(self.up_blocks):
            out = block(out, condition) if self.decoder_gade else block(out)
            if self.skip_connections:
                out = torch.cat([out, skips[self.num_down_blocks - 1 - index]], dim=1)
        return torch.sigmoid(self.output_conv(out))

    def extra_motion(self, face3d):
        """The 3D face slot of the dense motion: T_{S<-D,3D}, H_3D (eq. 11), deformed source I_r."""
        return ExtraMotion(flow=face3d["flow_3d"], heatmap=self.heatmap_3d(face3d),
                           deformed=face3d["I_r"])

    def forward(self, source_image, kp_driving, kp_source, face3d=None, condition=None,
                source_features=None):
        """``source_features``: ``encode(source_image)`` computed once for many driving frames."""
        extra = [self.extra_motion(face3d)] if self.use_3d_motion else None
        motion = self.estimate_motion(source_image, kp_driving, kp_source, extra)
        occlusion = motion["occlusion_maps"]
        occlusion_g = occlusion[:, :1]                                    # O_g
        features = source_features if source_features is not None else self.encode(source_image)
        flow = motion["deformation"]                                      # T_hat, eq. 12
        skips = [self.occlude(self.warp_feature(f, flow), occlusion_g) for f in features[:-1]] \
            if self.skip_connections else None
        top = self.warp_feature(features[-1], flow)                       # F_w
        if self.gade is not None:
            top = self.gade(top, condition, occlusion_g)                  # F_out, eq. 14
        else:
            top = self.occlude(top, occlusion_g)                          # FOMM: F_w * O_g
        x = self.bottleneck(top)
        if self.contextual_attention is not None:
            o_ca = resize_map(occlusion[:, 1:2], x.shape[-2:], self.align_corners)
            x = self.contextual_attention(x, o_ca)                        # O_ca
        return self.outputs(source_image, motion, self.decode(x, skips, condition))
