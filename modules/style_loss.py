"""Seed 003's training loss: the VGG-19 perceptual loss over an image pyramid (eq. 8) plus the
Gram-matrix style loss (Johnson et al. 2016; eq. 9), L = L_c + lambda_s L_s (eq. 10).

    L_c = sum_{i,j} || phi_i(I_g^j) - phi_i(I_d^j) ||          eq. 8 (j: pyramid level)
    L_s = sum_i || G_i(I_g) - G_i(I_d) ||,  G_i = phi_i phi_i^T / (C_i H_i W_i)      eq. 9

phi_i is the i-th VGG-19 activation map (relu1_1 .. relu5_1); eq. 9 uses the same phi_i as eq. 8,
flattened to C_i x (H_i W_i). The Gram matrix is divided by C_i H_i W_i (Johnson et al.'s
normalization) and the distance is the mean absolute difference of its entries (the paper's
"statistic error", in the l1 form of eq. 8, as the perceptual loss of this project takes the mean
absolute difference of the activations). L_s is computed at the full resolution only (eq. 9 has no
pyramid index), from the same VGG-19 pass as L_c's full-resolution level, so the style term costs
no extra pass; the other levels are ``modules.objectives.PerceptualPyramid``'s. The frozen VGG-19
is the one every perceptual loss of the project shares (``modules.objectives.shared_vgg19``).
"""
import torch

from modules.objectives import VGG19_SLICE_ENDS, PerceptualPyramid, shared_vgg19


def gram_matrix(features):
    """``B x C x H x W`` -> ``B x C x C``: phi phi^T / (C H W)."""
    batch, channels, height, width = features.shape
    flat = features.reshape(batch, channels, height * width)
    return flat @ flat.transpose(1, 2) / (channels * height * width)


def layer_distances(fake_features, real_features, layer_weights, transform=None):
    """``sum_i w_i mean |t(fake_i) - t(real_i)|`` over the VGG slices with a non-zero weight
    (``transform`` t: e.g. :func:`gram_matrix`; None: the activations themselves)."""
    total = 0
    for weight, fake, real in zip(layer_weights, fake_features, real_features):
        if weight:
            if transform is not None:
                fake, real = transform(fake), transform(real)
            total = total + weight * (fake - real).abs().mean()
    return total


class PerceptualStyleLoss:
    """``__call__(prediction, target) -> {'perceptual': L_c, 'style': lambda_s L_s}`` (terms with a
    zero weight left out). The target's features carry no gradient.

    Args:
        scales: the pyramid of L_c (e.g. FOMM's [1, 0.5, 0.25, 0.125]); 1 must be among them when
            the style term is on.
        perceptual_weights: one weight per VGG-19 slice for L_c (seed 003: all 1).
        style_weight: lambda_s (seed 003: 250); style_layers: one weight per slice for L_s.
        weights_path, imagenet: the VGG-19 file, or a fixed random VGG-19 (``imagenet=False``).
    """

    def __init__(self, scales, perceptual_weights, style_weight, style_layers=(1, 1, 1, 1, 1),
                 weights_path=None, imagenet=True):
        for name, weights in (("perceptual", perceptual_weights), ("style", style_layers)):
            if len(weights) != len(VGG19_SLICE_ENDS):
                raise ValueError(f"{name} loss layer weights need one value per VGG-19 slice "
                                 f"({len(VGG19_SLICE_ENDS)}), got {list(weights)}")
        scales = [float(s) for s in scales]
        self.perceptual_weights = [float(w) for w in perceptual_weights]
        self.style_weight = float(style_weight)
        self.style_layers = [float(w) for w in style_layers]
        if self.style_weight and 1.0 not in scales:
            raise ValueError(f"the style loss (eq. 9) compares full-resolution images: "
                             f"train_params.scales {scales} must include 1")
        self.full_scale = 1.0 in scales
        lower = [s for s in scales if s != 1.0]
        self.lower = PerceptualPyramid(lower, perceptual_weights, weights_path, imagenet) \
            if lower and any(self.perceptual_weights) else None
        self.weights_path, self.imagenet = weights_path, imagenet

    @classmethod
    def from_config(cls, train_params):
        """From ``scales``, ``loss_weights.perceptual``, ``loss_weights.style``, ``style_layers``
        and the perceptual loss's VGG-19 settings; None when both weights are zero."""
        weights = train_params["loss_weights"]
        if not any(weights["perceptual"]) and not weights["style"]:
            return None
        return cls(train_params["scales"], weights["perceptual"], weights["style"],
                   train_params["style_layers"], train_params["perceptual_weights_path"],
                   train_params["perceptual_pretrained"])

    def __call__(self, prediction, target):
        losses = {}
        perceptual = self.lower(prediction, target) if self.lower is not None else 0
        if self.full_scale:
            PerceptualPyramid.check_sizes({1.0: prediction})
            vgg = shared_vgg19(self.weights_path, self.imagenet, prediction.device,
                               prediction.dtype)
            fake = vgg(prediction)
            with torch.no_grad():
                real = vgg(target)
            perceptual = perceptual + layer_distances(fake, real, self.perceptual_weights)
            if self.style_weight:
                losses["style"] = self.style_weight * layer_distances(
                    fake, real, self.style_layers, gram_matrix)
        if any(self.perceptual_weights):
            losses["perceptual"] = perceptual
        return losses


__all__ = ["gram_matrix", "layer_distances", "PerceptualStyleLoss"]
