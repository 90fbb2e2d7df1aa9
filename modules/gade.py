"""Geometrically-Adaptive DEnormalization (GADE), SAFA section 4.4.1, eq. 13-14.

GADE injects the driving face's 3D geometry into the warped source features where the source
cannot be seen:

    F_hat = gamma * norm(F_w) + delta                       eq. 13 (gamma, delta per channel)
    F_out = O_g * F_w + (1 - O_g) * F_hat                   eq. 14

with ``gamma`` and ``delta`` produced by two fully connected layers from the driving 3DMM codes
Phi_D, normalized as in section 4.4.1 by :class:`CodeNormalizer`. ``O_g`` follows FOMM's
convention: 1 where the source is visible (F_w is kept), 0 where it is occluded (the
geometry-conditioned F_hat takes over).

Choices the paper leaves open (each one a constructor argument):

- Which normalization ``norm(.)`` is. The paper says GADE "takes normalized features" and
  "denormalizes" them, the vocabulary of SPADE, whose denormalization uses parameter-free
  (synchronized) batch norm; SAFA trains with synchronized batch norm throughout. Batch norm also
  keeps each sample's own per-channel statistics, i.e. the source's appearance, which the paper
  takes care to preserve (it refuses image features of the driving frame for that reason);
  instance norm would replace them with code-driven ones (AdaIN). Default: ``"batch"``.
  ``"instance"`` is available, and ``"none"`` reproduces the authors' code, which applies the
  affine map to the (already batch-normalized) encoder features directly.
- What conditions gamma and delta. Default: the normalized codes (the paper; 159 values for
  SAFA). The authors' code feeds the 3DMM encoder's 1280-d MobileNet feature instead: pass
  ``condition_dim=1280`` and that feature.
- What gates the blend. Default: ``O_g`` (eq. 14). ``gate="learned"`` uses a sigmoid of a 3x3
  convolution of F_w instead, as the GADE up-blocks in the authors' decoder do.

Initialization: gamma = 1 + fc_gamma(codes) and delta = fc_delta(codes) with both layers'
weights and biases set to zero, so a fresh layer starts at exactly gamma = 1, delta = 0
(F_hat = norm(F_w)); the weights still receive gradients from the first step on.
"""
import torch
import torch.nn.functional as F
from torch import nn

from modules.generator import resize_map

CODE_FIELDS = ("shape", "exp", "pose", "cam")
GADE_NORMS = ("batch", "instance", "none")
GADE_GATES = ("occlusion", "learned")


def code_field(codes, name):
    """Field ``name`` of a :class:`flame.codes.FaceCodes` or of a dict of tensors."""
    return codes[name] if isinstance(codes, dict) else getattr(codes, name)


def iterate_code_batches(codes):
    """One batch of codes (FaceCodes or dict) as a 1-element list; an iterable of them as is."""
    if isinstance(codes, dict) or hasattr(codes, "cam"):
        return [codes]
    return codes


class CodeNormalizer(nn.Module):
    """Flattens 3DMM codes into GADE's condition vector, normalized as in SAFA section 4.4.1.

    alpha (``shape``), beta (``exp``) and the camera scale s (``cam[:, 0]``) are divided by their
    average norms over the training set; theta (``pose``) and the translation t (``cam[:, 1:]``)
    pass unchanged. The three averages are buffers (saved in checkpoints), 1 until estimated.

    ``forward(codes)``: FaceCodes or dict with shape, exp, pose, cam (``B x n`` each) ->
    ``B x (n_shape + n_exp + n_pose + 3)`` in that order (``tex``/``light`` are not used).
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("shape_norm", torch.ones(()))   # mean ||alpha||
        self.register_buffer("exp_norm", torch.ones(()))     # mean ||beta||
        self.register_buffer("scale_norm", torch.ones(()))   # mean |s|

    def forward(self, codes):
        shape, exp, pose, cam = (code_field(codes, name) for name in CODE_FIELDS)
        return torch.cat([shape / self.shape_norm, exp / self.exp_norm, pose,
                          cam[:, :1] / self.scale_norm, cam[:, 1:]], dim=1)

    @torch.no_grad()
    def estimate(self, codes):
        """Set the three average norms from one batch of codes or an iterable of batches.

        Each average is over samples of the per-sample L2 norm (|s| for the scale). An average
        of zero (e.g. all-zero codes) leaves that divisor at 1. Returns ``self``.
        """
        totals, count = torch.zeros(3, dtype=torch.float64), 0
        for batch in iterate_code_batches(codes):
            shape, exp, cam = (code_field(batch, name) for name in ("shape", "exp", "cam"))
            norms = torch.stack([shape.norm(dim=1), exp.norm(dim=1), cam[:, 0].abs()], dim=1)
            totals += norms.double().sum(dim=0).cpu()
            count += norms.shape[0]
        if count == 0:
            raise ValueError("CodeNormalizer.estimate got no codes")
        for buffer, mean in zip((self.shape_norm, self.exp_norm, self.scale_norm),
                                totals / count):
            buffer.fill_(float(mean) if mean > 0 else 1.0)
        return self


def parameter_free_norm(num_features, kind):
    """The normalization GADE applies before denormalizing (no learned affine of its own)."""
    if kind == "batch":
        return nn.BatchNorm2d(num_features, affine=False)
    if kind == "instance":
        return nn.InstanceNorm2d(num_features, affine=False)
    if kind in (None, "none"):
        return nn.Identity()
    raise ValueError(f"unknown GADE norm {kind!r}; expected one of {GADE_NORMS}")


class GADE(nn.Module):
    """Geometrically-adaptive denormalization of warped features, eq. 13-14.

    Args:
        num_features: channels C of the features F_w.
        condition_dim: length D of the condition vector (159 = 100 + 50 + 6 + 3 normalized
            codes, the default; 1280 for the authors' MobileNet-feature variant).
        norm: ``"batch"`` (default), ``"instance"`` or ``"none"``: the parameter-free
            normalization before the affine map (see the module docstring).
        gate: ``"occlusion"`` (eq. 14 with O_g, default) or ``"learned"`` (sigmoid of a 3x3
            convolution of F_w; no occlusion map needed).

    ``forward(features, condition, occlusion_map=None)``:
        features       ``B x C x h x w``  F_w, the warped source features
        condition      ``B x D``          normalized driving codes (``CodeNormalizer``) or feature
        occlusion_map  ``B x 1 x H x W``  O_g in [0, 1], 1 = visible; bilinearly resized to h x w
        returns        ``B x C x h x w``  F_out
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


__all__ = ["CodeNormalizer", "GADE", "GADE_NORMS", "GADE_GATES"]
