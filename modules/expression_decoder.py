"""MMFA's expression decoder D_exp (seed 004, section 3.2 and appendix A.1): the expression
feature epsilon and the canonical keypoints x_c -> per-keypoint deformations delta.

The deformation depends on whose face it is ("the actual expression deformation should be related
to the identity of the target face"), so epsilon is concatenated with the flattened canonical
keypoints, which carry the spatial layout of the identity. Fully connected layers with batch norm
and ReLU process the concatenation; the last layer is a plain linear layer (deformations can be
negative): ``delta = D_exp(epsilon, x_c)``, ``B x K x 3``. It starts with a tenth of torch's
default weights and zero bias, so the first keypoints are close to the rigidly moved canonical
ones (the paper does not say how it initializes).
"""
import torch
from torch import nn

OUTPUT_INIT_SCALE = 0.1   # the last layer's default initialization, scaled down (our choice)


class ExpressionDecoder(nn.Module):
    """``forward(feature B x d, kp_canonical B x K x 3)`` -> deltas ``B x K x 3``."""

    def __init__(self, feature_dim=128, num_kp=15, hidden=(256, 256)):
        super().__init__()
        layers, previous = [], feature_dim + 3 * num_kp
        for width in hidden:
            layers += [nn.Linear(previous, width), nn.BatchNorm1d(width), nn.ReLU()]
            previous = width
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(previous, 3 * num_kp)
        with torch.no_grad():          # start with small deformations: x near s R x_c + t
            self.out.weight.mul_(OUTPUT_INIT_SCALE)
            self.out.bias.zero_()
        self.num_kp = num_kp

    def forward(self, feature, kp_canonical):
        if kp_canonical.shape[1] != self.num_kp:
            raise ValueError(f"the expression decoder was built for {self.num_kp} keypoints, got "
                             f"{kp_canonical.shape[1]}")
        inputs = torch.cat([feature, kp_canonical.flatten(1).to(feature.dtype)], dim=1)
        return self.out(self.hidden(inputs)).view(-1, self.num_kp, 3)
