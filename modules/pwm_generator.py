"""The progressive-warping encoder-decoder (seed 001, sections 3.3-3.4, Fig. 1(b)).

Encoder: a 7x7 block at full resolution then down blocks, giving the feature pyramid F_s^(l),
``level_channels(block_expansion, k, max_features)`` channels at 1/2^k of the input size. The
decoder runs from the coarsest level (l = 1) to the finest (l = L):

- initial level (no preceding PWM, so no SPADE and no estimation): with a geometric displacement
  guidance, F_s^(1) warped by it (resized to the level) is concatenated with F_s^(1) itself; with
  neural codes (or NMFC) the guidance, resized, is concatenated to F_s^(1) without warping. With
  both, both: [warped F_s^(1), F_s^(1), codes].
- every later level, one progressive warping module (PWM): the guidance resized to the level
  modulates the re-aligned features F_r^(l) in a SPADE residual block; one route of its output
  goes through a conv to the full displacement field D^(l) (2 channels, at level l), which is
  up-sampled and warps the encoder's shortcut feature F_s^(l+1); the warped feature is
  concatenated with the other route (the SPADE output, up-sampled) into F_r^(l+1).
- a final 7x7 conv (and a sigmoid: images are in [0, 1]) synthesizes the image from F_r^(L).

Displacements are normalized offsets (x, y): the backward flow of a level is
``make_coordinate_grid + D`` (``modules.coords.displacement_to_flow``).

Levels: the paper warps at "5 pyramid levels"; the authors' code has 6 levels with channels 32 to
1024. Both hold with ``num_levels=6, block_expansion=32, max_features=1024`` (the defaults): a
6-level pyramid (32 ... 1024 channels, full size down to 1/32) is 5 PWMs that estimate
displacements and warp (1/32 -> 1/16, ..., 1/2 -> 1). We read the paper's 5 as those; pass
``num_levels=5`` for 5 pyramid levels instead.

Normalization: SPADE with a parameter-free batch norm and ``x * (1 + gamma) + beta``, and
spectral normalization on every convolution (``spectral=True``), as the paper (section 3.4) and
the authors' code have it.

Losses on the intermediate levels: the paper trains with perceptual, adversarial and
feature-matching losses on the output image only, and the authors' code adds an L1 on the output
(weights: L1 10, VGG-19 pyramid 10, feature matching 10, GAN 1); neither supervises the
displacement fields. ``level_flows`` are returned for visuals (:func:`warped_sources`) and for
an optional warping loss, which we recommend keeping off (weight 0) by default for fidelity; a
small-weight loss between the source warped by each level's flow and the driving frame at that
scale is the usual remedy if the flows do not organize early in training.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from modules.blocks import DownBlock2d, SameBlock2d, level_channels
from modules.coords import displacement_to_flow, resize_map, warp
from modules.norms import SPADEResBlock

DISPLACEMENT_CHANNELS = 2


def spectral_norm_convs(module):
    """Spectral normalization on every convolution of ``module`` that lacks it (in place)."""
    for child in list(module.modules()):
        if isinstance(child, nn.Conv2d) and not parametrize.is_parametrized(child, "weight"):
            spectral_norm(child)
    return module


class ProgressiveWarpingModule(nn.Module):
    """One PWM at a decoder level (section 3.3, Fig. 1(b) right).

    ``forward(realigned F_r^(l), guidance at level l, shortcut F_s^(l+1))`` ->
    ``(F_r^(l+1), flow)``; ``flow`` is the backward flow of D^(l) at level l (B x h x w x 2).
    """

    def __init__(self, in_features, out_features, guidance_channels, hidden=128, norm="batch"):
        super().__init__()
        self.spade = SPADEResBlock(in_features, out_features, guidance_channels, norm=norm,
                                   spectral=False, hidden=hidden)
        self.displacement = nn.Conv2d(out_features, DISPLACEMENT_CHANNELS, 3, padding=1)

    def estimate(self, realigned, guidance):
        """(SPADE output, D^(l) B x 2 x h x w) at the level's resolution."""
        modulated = self.spade(realigned, guidance)
        return modulated, self.displacement(F.leaky_relu(modulated, 0.2))

    @staticmethod
    def realign(modulated, displacement, shortcut):
        """F_r^(l+1) = [SPADE output up-sampled, F_s^(l+1) warped by D^(l) up-sampled]."""
        flow = displacement_to_flow(displacement)
        warped = warp(shortcut, flow)                      # the flow is resized to the shortcut
        upsampled = resize_map(modulated, shortcut.shape[-2:])
        return torch.cat([upsampled, warped], dim=1), flow

    def forward(self, realigned, guidance, shortcut):
        modulated, displacement = self.estimate(realigned, guidance)
        return self.realign(modulated, displacement, shortcut)


class ProgressiveWarpingGenerator(nn.Module):
    """Encoder-decoder of PWMs: ``forward(source, guidance, encoder_input=None) -> dict``.

    Args:
        num_channels: image channels (3).
        encoder_input_channels: extra encoder input channels (the source-rendered neural codes:
            d = 16, NMFC: 3, geometric displacement: 0).
        guidance_channels: channels of the decoder guidance map.
        displacement_guidance: the guidance's first 2 channels are a geometric displacement
            (``geom_disp``, ``both``): the initial level warps with it.
        num_levels: pyramid levels L (L - 1 PWMs estimate displacements); see the module
            docstring (6: authors' code; the input size must be divisible by 2^(L-1)).
        block_expansion, max_features: channels ``min(max_features, block_expansion * 2^k)`` at
            1/2^k of the input size (32 and 1024 in the authors' code).
        spade_hidden: hidden channels of the SPADE layers (128).
        norm: encoder norm and SPADE's parameter-free norm ('batch').
        spectral: spectral normalization on every convolution (True).

    Returns ``prediction`` (B x 3 x H x W in [0, 1]), ``level_flows`` (the L - 1 estimated flows,
    coarse to fine, each B x h_l x w_l x 2 at its level) and ``initial_flow`` (the geometric
    displacement's flow at the coarsest level, or None).
    """

    def __init__(self, num_channels=3, encoder_input_channels=0, guidance_channels=2,
                 displacement_guidance=True, num_levels=6, block_expansion=32,
                 max_features=1024, spade_hidden=128, norm="batch", spectral=True):
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"num_levels must be at least 2 (one PWM), got {num_levels}")
        if displacement_guidance and guidance_channels < DISPLACEMENT_CHANNELS:
            raise ValueError("displacement_guidance needs the 2 displacement channels in the "
                             f"guidance; guidance_channels is {guidance_channels}")
        self.num_channels, self.encoder_input_channels = num_channels, encoder_input_channels
        self.guidance_channels = guidance_channels
        self.displacement_guidance = displacement_guidance
        self.channels = [level_channels(block_expansion, k, max_features)
                         for k in range(num_levels)]                       # finest first
        self.first = SameBlock2d(num_channels + encoder_input_channels, self.channels[0],
                                 kernel_size=7, padding=3, norm=norm)
        self.down_blocks = nn.ModuleList(
            DownBlock2d(self.channels[k - 1], self.channels[k], norm=norm)
            for k in range(1, num_levels))
        features = self._initial_channels()
        levels = []
        for k in reversed(range(num_levels - 1)):                          # coarse to fine
            levels.append(ProgressiveWarpingModule(features, self.channels[k], guidance_channels,
                                                   spade_hidden, norm))
            features = 2 * self.channels[k]
        self.levels = nn.ModuleList(levels)
        self.final = nn.Conv2d(features, num_channels, kernel_size=7, padding=3)
        if spectral:
            spectral_norm_convs(self)

    @property
    def num_levels(self):
        return len(self.channels)

    def _initial_channels(self):
        coarsest = self.channels[-1]
        if self.displacement_guidance:
            return 2 * coarsest + self.guidance_channels - DISPLACEMENT_CHANNELS
        return coarsest + self.guidance_channels

    # ------------------------------------------------------------------ pieces
    def encode(self, source, encoder_input=None):
        """F_s pyramid, finest first (``len == num_levels``)."""
        inputs = source
        if encoder_input is not None:
            inputs = torch.cat([source, resize_map(encoder_input.to(source.dtype),
                                                   source.shape[-2:])], dim=1)
        features = [self.first(inputs)]
        for block in self.down_blocks:
            features.append(block(features[-1]))
        return features

    def initial_features(self, coarsest, guidance):
        """F_r^(1) from F_s^(1) and the guidance (no SPADE, no estimation); and the flow of the
        geometric displacement at this level, or None."""
        guidance = resize_map(guidance.to(coarsest.dtype), coarsest.shape[-2:])
        if not self.displacement_guidance:
            return torch.cat([coarsest, guidance], dim=1), None
        flow = displacement_to_flow(guidance[:, :DISPLACEMENT_CHANNELS])
        parts = [warp(coarsest, flow), coarsest, guidance[:, DISPLACEMENT_CHANNELS:]]
        return torch.cat(parts, dim=1), flow

    def _check_inputs(self, source, guidance, encoder_input, encoded=False):
        expected = {"source": (source, self.num_channels),
                    "guidance": (guidance, self.guidance_channels)}
        if not encoded and (self.encoder_input_channels or encoder_input is not None):
            if encoder_input is None:
                raise ValueError(f"this generator takes {self.encoder_input_channels} encoder-input "
                                 "channels (the source-rendered guidance); pass encoder_input")
            expected["encoder_input"] = (encoder_input, self.encoder_input_channels)
        for name, (tensor, channels) in expected.items():
            if tensor.dim() != 4 or tensor.shape[1] != channels:
                raise ValueError(f"{name} must be B x {channels} x H x W, got {tuple(tensor.shape)}")
        factor = 2 ** (self.num_levels - 1)
        if source.shape[-2] % factor or source.shape[-1] % factor:
            raise ValueError(f"the source size {tuple(source.shape[-2:])} must be divisible by "
                             f"2^(num_levels - 1) = {factor}")

    # ------------------------------------------------------------------ forward
    def forward(self, source, guidance, encoder_input=None, source_features=None):
        """``source_features``: the pyramid :meth:`encode` gave for this source (and encoder
        input), computed once per source at inference; without it the encoder runs here."""
        self._check_inputs(source, guidance, encoder_input, encoded=source_features is not None)
        if source_features is None:
            features = self.encode(source, encoder_input)
        else:
            features = list(source_features)
            if len(features) != self.num_levels:
                raise ValueError(f"source_features must hold the {self.num_levels} levels of "
                                 f"encode(), got {len(features)}")
        realigned, initial_flow = self.initial_features(features[-1], guidance)
        flows = []
        for level, shortcut in zip(self.levels, reversed(features[:-1])):
            level_guidance = resize_map(guidance.to(realigned.dtype), realigned.shape[-2:])
            realigned, flow = level(realigned, level_guidance, shortcut)
            flows.append(flow)
        prediction = torch.sigmoid(self.final(F.leaky_relu(realigned, 0.2)))
        return {"prediction": prediction, "level_flows": flows, "initial_flow": initial_flow}


def warped_sources(source, flows):
    """The source image warped by each flow (resized to the image): a visual of every level."""
    return [warp(source, flow) for flow in flows]


__all__ = ["ProgressiveWarpingGenerator", "ProgressiveWarpingModule", "spectral_norm_convs",
           "warped_sources"]
