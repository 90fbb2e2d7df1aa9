"""SAFA's U-Net occlusion-aware generator (seed 000 section 4.4, Fig. 3).

FOMM's occlusion-aware generator with three changes: the dense motion network gets the 3D face
slot (T_{S<-D,3D}, H_3D and I_r) and two occlusion maps (O_g, O_ca); GADE modulates the warped
bottleneck features with the driving 3D geometry where O_g says the source is occluded; contextual
attention with O_ca plus a dilated branch follows the residual bottleneck; the decoder takes the
warped encoder features as U-Net skips.
"""
from modules.contextual_attention import ContextualAttentionModule
from modules.coords import resize_map
from modules.dense_motion import ExtraMotion
from modules.generator import OcclusionAwareGenerator
from modules.norms import GADE


class SAFAGenerator(OcclusionAwareGenerator):
    """U-Net occlusion-aware generator (section 4.4): encoder, warp, GADE with O_g, residual
    bottleneck, contextual attention with O_ca plus the dilated branch, decoder with warped skips."""

    def __init__(self, num_channels=3, num_kp=10, use_3d_motion=True, use_contextual_attention=True,
                 use_gade=True, condition_dim=159, gade_params=None, contextual_attention_params=None,
                 dense_motion_params=None, **generator_params):
        dense_motion_params = dict(dense_motion_params or {}, num_extra_motions=int(use_3d_motion),
                                   num_occlusion_maps=2 if use_contextual_attention else 1)
        super().__init__(num_channels, num_kp, dense_motion_params=dense_motion_params,
                         skip_connections=True, **generator_params)
        self.use_3d_motion = use_3d_motion
        top = self.channels[-1]
        self.gade = GADE(top, condition_dim, **(gade_params or {})) if use_gade else None
        self.contextual_attention = ContextualAttentionModule(
            top, **(contextual_attention_params or {})) if use_contextual_attention else None

    def forward(self, source_image, kp_driving, kp_source, face3d=None, condition=None):
        extra = None
        if self.use_3d_motion:  # the 3D face slot: T_{S<-D,3D}, H_3D (eq. 11), deformed source I_r
            extra = [ExtraMotion(flow=face3d["flow_3d"], heatmap=face3d["heatmap_3d"],
                                 deformed=face3d["I_r"])]
        motion = self.estimate_motion(source_image, kp_driving, kp_source, extra)
        occlusion = motion["occlusion_maps"]
        occlusion_g = occlusion[:, :1]                                    # O_g
        features = self.encode(source_image)
        flow = motion["deformation"]                                      # T_hat, eq. 12
        skips = [self.occlude(self.warp_feature(f, flow), occlusion_g) for f in features[:-1]]
        top = self.warp_feature(features[-1], flow)                       # F_w
        if self.gade is not None:
            top = self.gade(top, condition, occlusion_g)                  # F_out, eq. 14
        else:
            top = self.occlude(top, occlusion_g)                          # FOMM: F_w * O_g
        x = self.bottleneck(top)
        if self.contextual_attention is not None:
            x = self.contextual_attention(x, resize_map(occlusion[:, 1:2], x.shape[-2:]))  # O_ca
        return self.outputs(source_image, motion, self.decode(x, skips))
