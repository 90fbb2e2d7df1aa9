"""The Gram-matrix style loss (Johnson et al. 2016; seed 003 eq. 9).

    L_s = sum_i || G_i(I_g) - G_i(I_d) ||,    G_i = phi_i phi_i^T / (C_i H_i W_i)

phi_i is the i-th VGG-19 activation map (relu1_1 .. relu5_1, the layers of the perceptual loss:
eq. 9 uses the same phi_i as eq. 8), flattened to C_i x (H_i W_i); the Gram matrix is divided by
C_i H_i W_i (Johnson et al.'s normalization), and the distance is the mean absolute difference of the entries (the paper's "statistic error" in the
same l1 form as its eq. 8). Computed at the full resolution only (eq. 9 has no pyramid index).
The frozen VGG-19 is the one the perceptual loss shares (``modules.objectives.shared_vgg19``).
"""
import torch

from modules.objectives import VGG19_SLICE_ENDS, shared_vgg19


def gram_matrix(features):
    """``B x C x H x W`` -> ``B x C x C``: phi phi^T / (C H W)."""
    batch, channels, height, width = features.shape
    flat = features.reshape(batch, channels, height * width)
    return flat @ flat.transpose(1, 2) / (channels * height * width)


class GramStyleLoss:
    """``weight * sum_i layer_weight_i * mean |G_i(prediction) - G_i(target)|``.

    ``weight``: lambda_s (seed 003: 250); ``layer_weights``: one per VGG-19 slice (relu1_1 ..
    relu5_1). The target's Gram matrices carry no gradient. The VGG-19 loads on the first call,
    from the same file (or the same fixed random network) as the perceptual loss.
    """

    def __init__(self, weight, layer_weights=(1.0, 1.0, 1.0, 1.0, 1.0), weights_path=None,
                 imagenet=True):
        if len(layer_weights) != len(VGG19_SLICE_ENDS):
            raise ValueError(f"style loss layer weights need one value per VGG-19 slice "
                             f"({len(VGG19_SLICE_ENDS)}), got {list(layer_weights)}")
        self.weight = float(weight)
        self.layer_weights = [float(w) for w in layer_weights]
        self.weights_path, self.imagenet = weights_path, imagenet

    @classmethod
    def from_config(cls, train_params):
        """The style loss of ``train_params`` (``loss_weights.style``, ``style_layers``), or None
        when its weight is 0."""
        weight = train_params["loss_weights"]["style"]
        if not weight:
            return None
        return cls(weight, train_params["style_layers"], train_params["perceptual_weights_path"],
                   train_params["perceptual_pretrained"])

    def __call__(self, prediction, target):
        vgg = shared_vgg19(self.weights_path, self.imagenet, prediction.device, prediction.dtype)
        predicted = vgg(prediction)
        with torch.no_grad():
            real = vgg(target)
        total = prediction.new_zeros(())
        for layer_weight, fake, true in zip(self.layer_weights, predicted, real):
            if layer_weight:
                total = total + layer_weight * (gram_matrix(fake) - gram_matrix(true)).abs().mean()
        return self.weight * total


__all__ = ["gram_matrix", "GramStyleLoss"]
