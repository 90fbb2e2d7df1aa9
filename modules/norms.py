"""Conditional normalizations, in one place: every model that modulates features uses these.

All of them normalize without parameters of their own, then denormalize with a scale and a shift
predicted from a condition (the SPADE family, Park et al. 2019):

    out = norm(x) * (1 + gamma(c)) + beta(c)

==========  ==========================  ================================================  =========
layer       condition c                 gamma, beta                                       used by
==========  ==========================  ================================================  =========
``GADE``    a vector (3DMM codes)       per channel, + a visibility blend (eq. 13-14)     safa
``SPADE``   a map (segmentation, any    per pixel, from 3x3 convolutions of the map       pwm,
            rendered guidance)          resized to the features (nearest)                 mg3dmm,
                                                                                          facevid2vid
``AdaIN``   a vector (landmarks, codes) per channel, from fully connected layers          s2d,
                                                                                          mg3dmm
==========  ==========================  ================================================  =========

``parameter_free_norm`` makes the normalization they share: batch norm (synchronized across
processes by the trainer under DDP), instance norm, or none. GADE's ``1 + gamma`` form is the
same as SPADE's: its gamma layer starts at zero so a new layer starts as the plain norm.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from modules.blocks import NORMS, make_norm
from modules.coords import resize_map

NORM_KINDS = NORMS
GADE_GATES = ("occlusion", "learned")


def parameter_free_norm(num_features, kind="batch"):
    """Normalization without a learned affine: 'batch', 'instance' or 'none' (identity)."""
    return make_norm(num_features, kind, affine=False)


def maybe_spectral_norm(layer, enabled):
    """``layer`` with spectral normalization of its weight when ``enabled``."""
    return _spectral_norm(layer) if enabled else layer


# ----------------------------------------------------------------------------- GADE
class GADE(nn.Module):
    """Geometrically-adaptive denormalization of warped features, SAFA section 4.4.1, eq. 13-14.

        F_hat = gamma * norm(F_w) + delta                 eq. 13 (gamma, delta per channel)
        F_out = O_g * F_w + (1 - O_g) * F_hat             eq. 14

    gamma and delta come from two fully connected layers of the condition: the normalized driving
    3DMM codes Phi_D (the paper; ``face_kit.CodeNormalizer``, 159 values for SAFA) or the 3DMM
    encoder's 1280-d MobileNet feature (the authors' code). ``O_g`` is a visibility map (1 where
    the source is visible: F_w is kept; 0 where occluded: the geometry-conditioned F_hat takes
    over).

    Choices the paper leaves open (constructor arguments):

    - ``norm``: the parameter-free normalization before the affine map. The paper "denormalizes"
      normalized features, SPADE's vocabulary, whose norm is (synchronized) batch norm; batch norm
      also keeps each sample's own channel statistics (the source's appearance). Default
      ``"batch"``; ``"none"`` is the authors' code, which applies the affine map to the encoder's
      already batch-normalized features.
    - ``gate``: ``"occlusion"`` (eq. 14 with O_g, default) or ``"learned"`` (a sigmoid of a 3x3
      convolution of F_w, as the GADE up-blocks of the authors' decoder).

    gamma = 1 + fc_gamma(c) and delta = fc_delta(c) with both layers zero-initialized: a new layer
    is exactly F_hat = norm(F_w), and its weights still receive gradients from the first step.

    ``forward(features B x C x h x w, condition B x D, occlusion_map B x 1 x H x W = None)``.
    """

    def __init__(self, num_features, condition_dim=159, norm="batch", gate="occlusion"):
        super().__init__()
        if gate not in GADE_GATES:
            raise ValueError(f"unknown GADE gate {gate!r}; expected one of {GADE_GATES}")
        self.gate = gate
        self.norm = parameter_free_norm(num_features, norm)
        self.fc_gamma = nn.Linear(condition_dim, num_features)   # gamma - 1
        self.fc_delta = nn.Linear(condition_dim, num_features)   # delta
        for layer in (self.fc_gamma, self.fc_delta):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.gate_conv = None
        if gate == "learned":
            self.gate_conv = nn.Conv2d(num_features, 1, kernel_size=3, padding=1)

    def modulation(self, condition):
        """(gamma, delta), each ``B x C x 1 x 1``."""
        gamma = 1.0 + self.fc_gamma(condition)
        delta = self.fc_delta(condition)
        return gamma[:, :, None, None], delta[:, :, None, None]

    def denormalize(self, features, condition):
        """F_hat = gamma * norm(F_w) + delta, eq. 13."""
        gamma, delta = self.modulation(condition)
        return gamma * self.norm(features) + delta

    def blend_weight(self, features, occlusion_map):
        """The weight of F_w in eq. 14: O_g at the features' size, or the learned gate."""
        if self.gate == "learned":
            return torch.sigmoid(self.gate_conv(features))
        if occlusion_map is None:
            raise ValueError("GADE with gate='occlusion' needs the occlusion map O_g")
        return resize_map(occlusion_map, features.shape[-2:]).to(features.dtype)

    def forward(self, features, condition, occlusion_map=None):
        keep = self.blend_weight(features, occlusion_map)            # O_g
        denormalized = self.denormalize(features, condition)         # F_hat, eq. 13
        return keep * features + (1.0 - keep) * denormalized         # F_out, eq. 14


# ----------------------------------------------------------------------------- SPADE
class SPADE(nn.Module):
    """Spatially-adaptive denormalization (Park et al. 2019): per-pixel gamma and beta.

    The condition map (``label_nc`` channels, any resolution) is resized to the features with
    nearest sampling, passed through a shared 3x3 convolution + ReLU (``hidden`` channels) and two
    3x3 convolutions giving gamma and beta; ``out = norm(x) * (1 + gamma) + beta``.
    ``spectral``: spectral normalization on the three convolutions. Attribute names follow the
    SPADE/face-vid2vid layout (``param_free_norm``, ``mlp_shared.0``, ``mlp_gamma``, ``mlp_beta``),
    so published weights map one to one.
    """

    def __init__(self, num_features, label_nc, hidden=128, norm="instance", kernel_size=3,
                 spectral=False):
        super().__init__()
        padding = kernel_size // 2
        self.param_free_norm = parameter_free_norm(num_features, norm)
        self.mlp_shared = nn.Sequential(
            maybe_spectral_norm(nn.Conv2d(label_nc, hidden, kernel_size, padding=padding),
                                spectral),
            nn.ReLU())
        self.mlp_gamma = maybe_spectral_norm(
            nn.Conv2d(hidden, num_features, kernel_size, padding=padding), spectral)
        self.mlp_beta = maybe_spectral_norm(
            nn.Conv2d(hidden, num_features, kernel_size, padding=padding), spectral)

    def forward(self, x, condition_map):
        normalized = self.param_free_norm(x)
        condition = F.interpolate(condition_map.to(x.dtype), size=x.shape[-2:], mode="nearest")
        hidden = self.mlp_shared(condition)
        return normalized * (1 + self.mlp_gamma(hidden)) + self.mlp_beta(hidden)


class SPADEResBlock(nn.Module):
    """Residual block of two SPADE -> leaky ReLU 0.2 -> 3x3 conv stages (SPADE's generator block).

    ``in_features != out_features`` adds a learned shortcut (SPADE -> 1x1 conv without bias).
    ``spectral``: spectral normalization on the block's convolutions (``spadespectral*`` in SPADE's
    naming); ``spade_spectral`` also on the SPADE layers' own convolutions.
    """

    def __init__(self, in_features, out_features, label_nc, norm="instance", spectral=True,
                 spade_spectral=False, dilation=1, hidden=128):
        super().__init__()
        middle = min(in_features, out_features)
        self.learned_shortcut = in_features != out_features
        self.conv_0 = maybe_spectral_norm(nn.Conv2d(in_features, middle, 3, padding=dilation,
                                                    dilation=dilation), spectral)
        self.conv_1 = maybe_spectral_norm(nn.Conv2d(middle, out_features, 3, padding=dilation,
                                                    dilation=dilation), spectral)
        if self.learned_shortcut:
            self.conv_s = maybe_spectral_norm(nn.Conv2d(in_features, out_features, 1, bias=False),
                                              spectral)
        spade = dict(label_nc=label_nc, hidden=hidden, norm=norm, spectral=spade_spectral)
        self.norm_0 = SPADE(in_features, **spade)
        self.norm_1 = SPADE(middle, **spade)
        if self.learned_shortcut:
            self.norm_s = SPADE(in_features, **spade)

    def forward(self, x, condition_map):
        shortcut = self.conv_s(self.norm_s(x, condition_map)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, condition_map), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, condition_map), 0.2))
        return shortcut + dx


# ----------------------------------------------------------------------------- AdaIN
class AdaIN(nn.Module):
    """Adaptive instance normalization (Huang and Belongie 2017): per-channel gamma and beta from
    a vector, ``out = norm(x) * (1 + gamma(v)) + beta(v)``.

    ``hidden``: a shared fully connected layer + ReLU before the gamma/beta layers (PIRender's
    form); None maps the vector to gamma and beta directly. With ``norm='instance'`` (default) the
    output's channel means are exactly beta and its standard deviations |1 + gamma|, whatever the
    input's statistics: the vector sets them.
    """

    def __init__(self, num_features, condition_dim, hidden=None, norm="instance"):
        super().__init__()
        self.norm = parameter_free_norm(num_features, norm)
        width = hidden or condition_dim
        self.mlp_shared = nn.Sequential(nn.Linear(condition_dim, hidden), nn.ReLU()) \
            if hidden else nn.Identity()
        self.mlp_gamma = nn.Linear(width, num_features)
        self.mlp_beta = nn.Linear(width, num_features)

    def modulation(self, condition):
        hidden = self.mlp_shared(condition)
        return self.mlp_gamma(hidden)[:, :, None, None], self.mlp_beta(hidden)[:, :, None, None]

    def forward(self, x, condition):
        gamma, beta = self.modulation(condition.to(x.dtype))
        return self.norm(x) * (1 + gamma) + beta


__all__ = ["NORM_KINDS", "parameter_free_norm", "maybe_spectral_norm", "GADE", "GADE_GATES",
           "SPADE", "SPADEResBlock", "AdaIN"]
