"""A discriminator of feature vectors (MMFA's expression VAE, seed 004 section 3.3): real
expression features against the VAE's reconstructions.

An MLP (linear + leaky ReLU 0.2) to one score per sample. It answers in the multi-scale
discriminators' format, ``{1.0: {'features': [hidden activations], 'prediction': B x 1}}``, so
:class:`modules.objectives.AdversarialObjective` trains it like any image discriminator (LSGAN
or hinge, feature matching on the hidden layers).
"""
import torch.nn.functional as F
from torch import nn


class FeatureDiscriminator(nn.Module):
    def __init__(self, feature_dim=128, hidden=(256, 256)):
        super().__init__()
        sizes = [feature_dim, *hidden]
        self.layers = nn.ModuleList(nn.Linear(sizes[i], sizes[i + 1]) for i in range(len(hidden)))
        self.head = nn.Linear(sizes[-1], 1)

    def forward(self, feature, condition=None):
        features, out = [], feature
        for layer in self.layers:
            out = F.leaky_relu(layer(out), 0.2)
            features.append(out)
        return {1.0: {"features": features, "prediction": self.head(out)}}
