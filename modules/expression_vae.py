"""MMFA's latent VAE of expressions (seed 004, section 3.3, figure 4).

The expression feature epsilon (``modules/expression_encoder.py``) is mapped to a Gaussian
q(z | epsilon) = N(mu, diag(sigma^2)) (eq. 10), sampled with the reparameterization trick
z = mu + sigma * n, n ~ N(0, I) (eq. 11), and decoded back to a feature epsilon_hat (eq. 12).
Trained with lambda_KL KL(q || N(0, I)) + lambda_rec |epsilon - epsilon_hat|^2 + lambda_adv L_adv
(eq. 13); the adversarial term against a feature discriminator
(``modules/feature_discriminator.py``) is the paper's fix for posterior collapse.

Encoder and decoder are MLPs (linear + leaky ReLU 0.2); the paper does not give their sizes. The
encoder predicts log sigma^2 (numerically safer than sigma).

Interpolation (section 4.4): :func:`interpolate_features` walks the latent line between two
expressions' means and decodes it; the endpoints' reconstruction residuals are blended along, so
t = 0 and t = 1 give the two expression features exactly (the VAE reconstructs them only
approximately) and the path in between is the VAE's.
"""
import torch
from torch import nn

from modules.precision import full_precision


def mlp(sizes):
    layers = []
    for index in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[index], sizes[index + 1]))
        if index < len(sizes) - 2:
            layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


def kl_divergence(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, I)) summed over the latent dimensions, averaged over the batch:
    0.5 sum(mu^2 + sigma^2 - log sigma^2 - 1). Zero exactly at mu = 0, sigma = 1."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(dim=1).mean()


class ExpressionVAE(nn.Module):
    """``forward(feature B x feature_dim)`` -> ``{'mu', 'logvar', 'z', 'reconstruction'}``;
    ``z`` is sampled in training mode and the mean ``mu`` in eval mode."""

    def __init__(self, feature_dim=128, latent_dim=32, hidden=(256, 256)):
        super().__init__()
        self.encoder = mlp([feature_dim, *hidden, 2 * latent_dim])
        self.decoder = mlp([latent_dim, *reversed(hidden), feature_dim])
        self.feature_dim, self.latent_dim = feature_dim, latent_dim

    def encode(self, feature):
        """(mu, log sigma^2), eq. 10."""
        mu, logvar = self.encoder(feature).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z):
        """epsilon_hat, eq. 12."""
        return self.decoder(z)

    # Float32 under autocast (modules/precision.py): a few small matrix products whose output is
    # compared with its input (the reconstruction error, a few % of the feature): 16-bit rounding
    # would be a visible part of that error, at no speed gain worth having.
    @full_precision
    def forward(self, feature):
        mu, logvar = self.encode(feature)
        z = mu
        if self.training:                                    # eq. 11
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return {"mu": mu, "logvar": logvar, "z": z, "reconstruction": self.decode(z)}


def interpolate_features(vae, feature_a, feature_b, weights):
    """Expression features along the VAE's latent line from ``feature_a`` to ``feature_b``
    (``1 x feature_dim`` each) at ``weights`` t (``T``): ``T x feature_dim``, with
    decode((1 - t) mu_a + t mu_b) + (1 - t) r_a + t r_b, r = feature - decode(mu)."""
    mu_a, _ = vae.encode(feature_a)
    mu_b, _ = vae.encode(feature_b)
    t = torch.as_tensor(weights, dtype=mu_a.dtype, device=mu_a.device).reshape(-1, 1)
    residual_a = feature_a - vae.decode(mu_a)
    residual_b = feature_b - vae.decode(mu_b)
    path = vae.decode((1 - t) * mu_a + t * mu_b)
    return path + (1 - t) * residual_a + t * residual_b


__all__ = ["kl_divergence", "ExpressionVAE", "interpolate_features"]
