"""MMFA's multi-scale generator (seed 004, section 3.2 and appendix A.1, figure 2(c)).

face-vid2vid's pipeline up to the warped 3D feature volume (``modules/generator_3d.py``: appearance
volume, 3D dense motion, warp, fold the depth into channels, 2D conv, occlusion), then a decoder
that outputs an image at every resolution it passes through:

    f = warped 2D feature map (``block_expansion * 2^n`` channels at 1 / 2^n of the frame)
    repeat for each of the n + 1 levels:
        f   = ResBlock(f)
        y_i = sigmoid(conv 7x7(f))                   the output image at this resolution
        f   = UpBlock(concat(f, y_i))                (not after the last level) x2 size,
                                                     half the channels
so a 256 px frame with two down blocks gives images at 64, 128 and 256 px; the last is the
prediction. The multi-scale perceptual loss (eq. 6) compares each y_i with the ground truth at
its resolution.
"""
import torch
from torch import nn

from modules.blocks import ResBlock2d, UpBlock2d
from modules.generator_3d import OcclusionAwareGenerator3d


def render_from_volume(generator, volume, kp_driving, kp_source):
    """An :class:`OcclusionAwareGenerator3d`'s output from an appearance volume computed before
    (once per source at inference): 3D dense motion, warp, decoder (``generator.decode`` when it
    has one, e.g. the multi-scale generator's)."""
    motion = generator.dense_motion_network(volume, kp_driving=kp_driving, kp_source=kp_source)
    result = {key: motion[key] for key in ("mask", "occlusion_map", "deformation")
              if key in motion}
    features = generator.warped_features(volume, motion)
    decode = getattr(generator, "decode", None)
    result.update(decode(features) if decode else {"prediction": generator.decoder(features)})
    return result


class MultiScaleDecoder(nn.Module):
    """``forward(feature B x in_features x h x w)`` -> images ``[B x C x h 2^i x w 2^i]`` for
    ``i = 0 .. num_levels - 1`` (coarse to fine), each in [0, 1]."""

    def __init__(self, in_features, num_levels=3, image_channel=3):
        super().__init__()
        widths = [max(in_features // 2 ** level, 1) for level in range(num_levels)]
        self.resblocks = nn.ModuleList(ResBlock2d(width) for width in widths)
        self.to_image = nn.ModuleList(nn.Conv2d(width, image_channel, kernel_size=7, padding=3)
                                      for width in widths)
        self.up_blocks = nn.ModuleList(UpBlock2d(widths[i] + image_channel, widths[i + 1])
                                       for i in range(num_levels - 1))

    def forward(self, feature):
        images = []
        for level, (resblock, to_image) in enumerate(zip(self.resblocks, self.to_image)):
            feature = resblock(feature)
            image = torch.sigmoid(to_image(feature))
            images.append(image)
            if level < len(self.up_blocks):
                feature = self.up_blocks[level](torch.cat([feature, image], dim=1))
        return images


class MultiScaleGenerator3d(OcclusionAwareGenerator3d):
    """:class:`OcclusionAwareGenerator3d` with :class:`MultiScaleDecoder` (``num_down_blocks + 1``
    levels). Arguments as the parent's, without ``decoder`` / ``spade_params``.

    ``forward`` returns the parent's dict with ``prediction`` (the finest image) and
    ``predictions`` (every level, coarse to fine).
    """

    def __init__(self, num_kp=15, image_channel=3, feature_channel=32, block_expansion=64,
                 max_features=512, num_down_blocks=2, reshape_channel=32, reshape_depth=16,
                 num_resblocks=6, estimate_occlusion_map=True, dense_motion_params=None,
                 first_kernel_size=7, align_corners=False):
        super().__init__(num_kp=num_kp, image_channel=image_channel,
                         feature_channel=feature_channel, block_expansion=block_expansion,
                         max_features=max_features, num_down_blocks=num_down_blocks,
                         reshape_channel=reshape_channel, reshape_depth=reshape_depth,
                         num_resblocks=num_resblocks,
                         estimate_occlusion_map=estimate_occlusion_map,
                         dense_motion_params=dense_motion_params,
                         first_kernel_size=first_kernel_size, align_corners=align_corners)
        # the parent builds face-vid2vid's single-output decoder; MMFA replaces it
        self.decoder = MultiScaleDecoder(block_expansion * 2 ** num_down_blocks,
                                         num_down_blocks + 1, image_channel)

    def decode(self, features):
        images = self.decoder(features)
        return {"prediction": images[-1], "predictions": images}

    def forward(self, source_image, kp_driving, kp_source):
        return render_from_volume(self, self.appearance_volume(source_image), kp_driving,
                                  kp_source)
