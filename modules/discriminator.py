"""Multi-scale patch discriminator (FOMM [1]; SAFA [1, 0.5, 0.25], pix2pixHD-style)."""
import torch
import torch.nn.functional as F
from torch import nn

from modules.blocks import level_channels, make_norm
from modules.util import KP_VARIANCE, ImagePyramid, kp2gaussian


def reference_spectral_norm(layer, enabled):
    """``layer`` with spectral normalization of its weight when ``enabled``, as the reference.

    This is torch's original hook form (``torch.nn.utils.spectral_norm``), not the parametrization
    used elsewhere in the framework, on purpose: its state entries are ``weight_orig``,
    ``weight_u`` and ``weight_v`` like the released discriminators', and each training-mode call
    runs one power iteration in the reference's order (v from u, then u from v) before dividing
    by sigma = u^T W v, so the power-iteration buffers evolve exactly as in the reference code.
    In eval mode both forms divide by u^T W v with the stored vectors.
    """
    return nn.utils.spectral_norm(layer) if enabled else layer


class DiscriminatorBlock(nn.Module):
    """4x4 conv (no padding) -> optional instance norm -> leaky ReLU 0.2 -> optional 2x2 avg pool."""

    def __init__(self, in_features, out_features, norm=False, pool=False, kernel_size=4,
                 use_spectral_norm=False):
        super().__init__()
        conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size)
        self.conv = reference_spectral_norm(conv, use_spectral_norm)
        self.norm = make_norm(out_features, "instance" if norm else "none")
        self.pool = pool

    def forward(self, x):
        out = F.leaky_relu(self.norm(self.conv(x)), 0.2)
        return F.avg_pool2d(out, 2) if self.pool else out


class PatchDiscriminator(nn.Module):
    """``num_blocks`` discriminator blocks and a 1x1 conv to a map of real/fake scores.

    Instance norm (affine) on every block except the first, which sees the raw image (pix2pixHD /
    FOMM). Every block but the last halves the resolution. With ``use_kp`` the keypoints'
    gaussian heatmaps are concatenated to the image. The input must be large enough for the
    unpadded 4x4 convs (about 46 px for 4 blocks).
    """

    def __init__(self, num_channels=3, block_expansion=32, num_blocks=4, max_features=512,
                 use_spectral_norm=False, use_kp=False, num_kp=10, kp_variance=KP_VARIANCE):
        super().__init__()
        self.use_kp = use_kp
        self.kp_variance = kp_variance
        channels = [num_channels + (num_kp if use_kp else 0)] + [
            level_channels(block_expansion, i + 1, max_features) for i in range(num_blocks)]
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(channels[i], channels[i + 1], norm=(i != 0),
                               pool=(i != num_blocks - 1), use_spectral_norm=use_spectral_norm)
            for i in range(num_blocks))
        self.head = reference_spectral_norm(nn.Conv2d(channels[-1], 1, kernel_size=1),
                                            use_spectral_norm)

    def forward(self, image, kp=None):
        """``(features: list of every block's output, prediction: B x 1 x h x w)``."""
        out = image
        if self.use_kp:
            if kp is None:
                raise ValueError("this discriminator was built with use_kp=True: pass keypoints")
            heatmaps = kp2gaussian(kp["value"], image.shape[-2:], self.kp_variance)
            out = torch.cat([out, heatmaps.to(image.dtype)], dim=1)
        features = []
        for block in self.blocks:
            out = block(out)
            features.append(out)
        return features, self.head(out)


class MultiScaleDiscriminator(nn.Module):
    """One :class:`PatchDiscriminator` per scale of an anti-aliased image pyramid.

    ``forward(image, kp=None)`` returns ``{scale: {'features': [...], 'prediction': map}}``.
    ``pyramid_method``: how the pyramid shrinks the image (``modules.util.ImagePyramid``; default
    the reference's gaussian blur + subsampling).
    """

    def __init__(self, scales=(1.0,), pyramid_method="gaussian_subsample", **discriminator_params):
        super().__init__()
        self.scales = [float(s) for s in scales]
        self.pyramid = ImagePyramid(self.scales, method=pyramid_method)
        self.discriminators = nn.ModuleList(PatchDiscriminator(**discriminator_params)
                                            for _ in self.scales)

    def forward(self, image, kp=None):
        results = {}
        pyramid = self.pyramid(image)
        for scale, discriminator in zip(self.scales, self.discriminators):
            features, prediction = discriminator(pyramid[scale], kp)
            results[scale] = {"features": features, "prediction": prediction}
        return results
