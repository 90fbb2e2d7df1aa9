"""Occlusion-aware generator of face-vid2vid (Wang et al. 2021) with a 3D appearance volume.

    f_s  = appearance_volume(source)      2D encoder, channels reshaped into a C x D volume,
                                          3D residual blocks
    w    = dense motion(f_s, x_D, x_S)    3D flow + occlusion map (``modules/dense_motion_3d.py``)
    f_w  = fold(warp(f_s, w))             warped volume, depth folded back into channels
    f    = 1x1 conv(SameBlock(f_w)) * O   2D features masked by the occlusion map
    y    = decoder(f)                     'original': 2D residual blocks, up blocks, 7x7 conv,
                                          sigmoid (``OcclusionAwareGenerator`` of the reference);
                                          'spade': ``modules/spade_decoder.py``
                                          (``OcclusionAwareSPADEGenerator``, its released model)

MMFA keeps this pipeline and replaces the decoder with a multi-scale one.
"""
import torch
from torch import nn

from modules.blocks import DownBlock2d, ResBlock2d, SameBlock2d, UpBlock2d, level_channels
from modules.blocks_3d import ResBlock3d
from modules.coords import resize_map, warp_volume
from modules.dense_motion_3d import DenseMotionNetwork3d
from modules.spade_decoder import SPADEDecoder

DECODERS = ("original", "spade")
FIRST_KERNEL_SIZES = {"original": 7, "spade": 3}   # the reference's two generator classes
THIRD_BLOCK_SLOPE = 0.01   # leaky ReLU of the block after the warp (torch's default slope)


class ResidualDecoder(nn.Module):
    """2D residual blocks -> up blocks (x2 each) -> 7x7 conv -> sigmoid."""

    def __init__(self, block_expansion=64, num_up_blocks=2, num_resblocks=6, image_channel=3):
        super().__init__()
        channels = [block_expansion * 2 ** (num_up_blocks - i) for i in range(num_up_blocks + 1)]
        self.resblocks = nn.Sequential(*[ResBlock2d(channels[0]) for _ in range(num_resblocks)])
        self.up_blocks = nn.ModuleList(UpBlock2d(channels[i], channels[i + 1])
                                       for i in range(num_up_blocks))
        self.final = nn.Conv2d(channels[-1], image_channel, kernel_size=7, padding=3)

    def forward(self, feature):
        out = self.resblocks(feature)
        for block in self.up_blocks:
            out = block(out)
        return torch.sigmoid(self.final(out))


class OcclusionAwareGenerator3d(nn.Module):
    """``forward(source_image, kp_driving, kp_source)`` -> ``{'prediction', 'mask',
    'occlusion_map', 'deformation'}``.

    Arguments mirror the reference ``generator_params`` + ``common_params``: the 2D encoder ends in
    ``max_features = reshape_channel * reshape_depth`` channels, reshaped into a
    ``reshape_channel x reshape_depth`` volume; ``feature_channel`` (the dense motion network's
    input) must equal ``reshape_channel``. ``dense_motion_params``: keyword arguments of
    :class:`DenseMotionNetwork3d` (``block_expansion``, ``max_features``, ``num_blocks``,
    ``reshape_depth``, ``compress``). ``decoder``: 'original' or 'spade' (``spade_params``:
    keyword arguments of :class:`SPADEDecoder`). ``first_kernel_size``: the first convolution's
    kernel (None: 7 with the original decoder, 3 with SPADE, as the reference's two classes).
    ``align_corners``: the volume warp's sampling convention (the reference: False).
    """

    def __init__(self, num_kp=15, image_channel=3, feature_channel=32, block_expansion=64,
                 max_features=512, num_down_blocks=2, reshape_channel=32, reshape_depth=16,
                 num_resblocks=6, estimate_occlusion_map=True, dense_motion_params=None,
                 decoder="original", spade_params=None, first_kernel_size=None,
                 align_corners=False):
        super().__init__()
        self.check_widths(feature_channel, max_features, reshape_channel, reshape_depth, decoder)
        self.reshape_channel = reshape_channel
        self.reshape_depth = reshape_depth
        self.align_corners = align_corners
        self.dense_motion_network = None
        if dense_motion_params is not None:
            self.dense_motion_network = DenseMotionNetwork3d(
                num_kp=num_kp, feature_channel=feature_channel,
                estimate_occlusion_map=estimate_occlusion_map, align_corners=align_corners,
                **dense_motion_params)
        channels = [level_channels(block_expansion, i, max_features)
                    for i in range(num_down_blocks + 1)]
        first_kernel_size = first_kernel_size or FIRST_KERNEL_SIZES[decoder]
        self.first = SameBlock2d(image_channel, block_expansion, kernel_size=first_kernel_size,
                                 padding=first_kernel_size // 2)
        self.down_blocks = nn.ModuleList(DownBlock2d(channels[i], channels[i + 1])
                                         for i in range(num_down_blocks))
        self.second = nn.Conv2d(channels[-1], max_features, kernel_size=1)
        self.resblocks_3d = nn.Sequential(*[ResBlock3d(reshape_channel)
                                            for _ in range(num_resblocks)])
        decoder_features = block_expansion * 2 ** num_down_blocks
        self.third = SameBlock2d(max_features, decoder_features, kernel_size=3, padding=1,
                                 negative_slope=THIRD_BLOCK_SLOPE)
        self.fourth = nn.Conv2d(decoder_features, decoder_features, kernel_size=1)
        if decoder == "spade":
            self.decoder = SPADEDecoder(**{"in_features": decoder_features,
                                           "image_channel": image_channel, **(spade_params or {})})
        else:
            self.decoder = ResidualDecoder(block_expansion, num_down_blocks, num_resblocks,
                                           image_channel)

    @staticmethod
    def check_widths(feature_channel, max_features, reshape_channel, reshape_depth, decoder):
        if decoder not in DECODERS:
            raise ValueError(f"unknown generator decoder {decoder!r}; expected one of {DECODERS}")
        if max_features != reshape_channel * reshape_depth:
            raise ValueError(f"generator max_features ({max_features}) must equal reshape_channel"
                             f" * reshape_depth ({reshape_channel} * {reshape_depth}): the 2D "
                             f"encoder's output is reshaped into the appearance volume")
        if feature_channel != reshape_channel:
            raise ValueError(f"feature_channel ({feature_channel}) must equal the generator's "
                             f"reshape_channel ({reshape_channel}): the dense motion network "
                             f"reads the appearance volume")

    def appearance_volume(self, source_image):
        """f_s: ``B x reshape_channel x reshape_depth x H/2^n x W/2^n``."""
        out = self.first(source_image)
        for block in self.down_blocks:
            out = block(out)
        out = self.second(out)
        batch, _, height, width = out.shape
        volume = out.view(batch, self.reshape_channel, self.reshape_depth, height, width)
        return self.resblocks_3d(volume)

    def warped_features(self, volume, motion):
        """The volume warped by the 3D flow, folded to 2D, ``third`` + ``fourth``, occluded."""
        if "deformation" in motion:
            volume = warp_volume(volume, motion["deformation"], align_corners=self.align_corners)
        batch, channels, depth, height, width = volume.shape
        out = self.fourth(self.third(volume.reshape(batch, channels * depth, height, width)))
        occlusion_map = motion.get("occlusion_map")
        if occlusion_map is not None:
            out = out * resize_map(occlusion_map, out.shape[-2:]).to(out.dtype)
        return out

    def forward(self, source_image, kp_driving, kp_source):
        volume = self.appearance_volume(source_image)
        motion = {}
        if self.dense_motion_network is not None:
            motion = self.dense_motion_network(volume, kp_driving=kp_driving, kp_source=kp_source)
        result = {key: motion[key] for key in ("mask", "occlusion_map", "deformation")
                  if key in motion}
        result["prediction"] = self.decoder(self.warped_features(volume, motion))
        return result
