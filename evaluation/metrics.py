"""Evaluation metrics, one definition each.

Images are float tensors ``B x 3 x H x W`` in [0, 1] on any device; per-image metrics return a
``B`` tensor so callers can average over frames, videos or whole test sets as a protocol demands.
Metrics that need a network take the network's *output* (features, landmarks, embeddings, codes):
the networks themselves live in :mod:`modules.backends` and :mod:`evaluation.backends`, so each formula here is testable
without weights.

Landmarks are ``... x 68 x 2`` arrays in pixel-index coordinates (``modules/coords.py``); a frame
whose face was not found is a row of NaN.
"""
import math

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

# How every mean over a test set is taken, in evaluate's tables and reconstruction's metrics.json.
MEAN_DEFINITION = "per frame: every evaluated frame of every video weighs the same, as the papers"

# Wang et al. (2003), "Multi-scale structural similarity": per-scale exponents for 5 scales.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_K1, SSIM_K2 = 0.01, 0.03


# --------------------------------------------------------------------------- pixel metrics
def _check_pair(a, b):
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() != 4:
        raise ValueError(f"expected B x C x H x W images, got shape {tuple(a.shape)}")


def l1(generated, target):
    """Mean absolute difference per image (seed 000's L1, in [0, 1] intensity units)."""
    _check_pair(generated, target)
    return (generated - target).abs().flatten(1).mean(1)


def mse(generated, target):
    _check_pair(generated, target)
    return (generated - target).pow(2).flatten(1).mean(1)


def psnr(generated, target, data_range=1.0):
    """Peak signal-to-noise ratio per image in dB: ``10 log10(range^2 / MSE)`` (inf if equal)."""
    error = mse(generated, target)
    return 10.0 * torch.log10(data_range ** 2 / error)


def gaussian_window(size=11, sigma=1.5, dtype=torch.float32, device=None):
    """Normalized 1-D gaussian of ``size`` taps centred on the middle tap."""
    offsets = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    window = torch.exp(-offsets ** 2 / (2.0 * sigma ** 2))
    return window / window.sum()


def _blur_valid(images, window):
    """Separable gaussian filter, keeping only positions where the window fits inside the image."""
    channels = images.shape[1]
    horizontal = window.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = window.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    out = F.conv2d(images, horizontal, groups=channels)
    return F.conv2d(out, vertical, groups=channels)


def _ssim_maps(x, y, window, data_range):
    """Luminance term and contrast-structure term maps (B x C x h x w) of SSIM.

    Uses population (not sample) statistics within the gaussian window, as
    ``skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False)``.
    Only "valid" positions are kept, which equals skimage's cropping of the filter's border.
    """
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    channels = x.shape[1]
    # one grouped filtering pass over the five stacked maps
    blurred = _blur_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), window)
    mu_x, mu_y, xx, yy, xy = blurred.split(channels, dim=1)
    var_x = xx - mu_x ** 2
    var_y = yy - mu_y ** 2
    cov_xy = xy - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)
    contrast_structure = (2 * cov_xy + c2) / (var_x + var_y + c2)
    return luminance, contrast_structure


def _check_window_fits(images, win_size):
    if min(images.shape[-2:]) < win_size:
        raise ValueError(f"images of size {tuple(images.shape[-2:])} are smaller than the "
                         f"{win_size}x{win_size} SSIM window")


def ssim(generated, target, data_range=1.0, win_size=11, sigma=1.5):
    """Structural similarity per image (mean over positions and channels).

    Gaussian window of ``win_size`` taps and std ``sigma``, constants K1 = 0.01, K2 = 0.03: the
    setting of Wang et al. (2004) and of scikit-image with ``gaussian_weights=True``.
    """
    _check_pair(generated, target)
    _check_window_fits(generated, win_size)
    window = gaussian_window(win_size, sigma, generated.dtype, generated.device)
    luminance, contrast_structure = _ssim_maps(generated, target, window, data_range)
    return (luminance * contrast_structure).flatten(1).mean(1)


def ms_ssim(generated, target, data_range=1.0, weights=MS_SSIM_WEIGHTS, win_size=11, sigma=1.5):
    """Multi-scale SSIM per image (Wang et al. 2003).

    Contrast-structure is taken at every scale, luminance only at the coarsest; between scales the
    images are halved by 2x2 average pooling. The product of per-scale terms raised to ``weights``
    gives the score; terms are clamped at 0 first so a negative correlation cannot produce NaN.
    The coarsest scale must still hold the window: 5 scales need at least 161 pixels a side
    (pass fewer ``weights`` for smaller images).
    """
    _check_pair(generated, target)
    scales = len(weights)
    needed = (win_size - 1) * 2 ** (scales - 1) + 1
    if min(generated.shape[-2:]) < needed:
        raise ValueError(f"MS-SSIM with {scales} scales and a {win_size}-tap window needs images of "
                         f"at least {needed} pixels a side, got {tuple(generated.shape[-2:])}; "
                         f"pass fewer weights")
    window = gaussian_window(win_size, sigma, generated.dtype, generated.device)
    weights = torch.as_tensor(weights, dtype=generated.dtype, device=generated.device)
    x, y = generated, target
    terms = []
    for scale in range(scales):
        luminance, contrast_structure = _ssim_maps(x, y, window, data_range)
        if scale == scales - 1:
            terms.append((luminance * contrast_structure).flatten(1).mean(1))
        else:
            terms.append(contrast_structure.flatten(1).mean(1))
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    terms = torch.stack(terms, dim=1).clamp_min(0.0)
    return torch.prod(terms ** weights, dim=1)


# --------------------------------------------------------------------------- Frechet distance
class FeatureStatistics:
    """Running mean and covariance of feature vectors, accumulated in float64.

    Keeps only a mean and a ``D x D`` scatter matrix, merged batch by batch (Chan et al.'s pairwise
    update, stable even when features have a large mean), so the set of images can be as large as
    the test set.
    """

    def __init__(self):
        self.count = 0
        self._mean = None
        self._scatter = None

    def update(self, features):
        features = np.asarray(torch.as_tensor(features).detach().cpu().double())
        features = features.reshape(features.shape[0], -1)
        if features.shape[0] == 0:
            return
        batch_mean = features.mean(0)
        centred = features - batch_mean
        batch_scatter = centred.T @ centred
        if self._mean is None:
            self.count, self._mean, self._scatter = features.shape[0], batch_mean, batch_scatter
            return
        n_old, n_new = self.count, features.shape[0]
        self.count = n_old + n_new
        delta = batch_mean - self._mean
        self._mean = self._mean + delta * (n_new / self.count)
        self._scatter = self._scatter + batch_scatter + np.outer(delta, delta) * (n_old * n_new / self.count)

    @property
    def dimension(self):
        return 0 if self._mean is None else self._mean.shape[0]

    def mean_and_covariance(self):
        """Mean and unbiased covariance (divisor ``n - 1``, as ``numpy.cov``)."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.count}")
        return self._mean.copy(), self._scatter / (self.count - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6, method="sqrtm"):
    """Frechet distance between two gaussians (Heusel et al. 2017, the FID formula).

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``.

    ``method='sqrtm'`` (default, as pytorch-fid) takes ``scipy.linalg.sqrtm`` of the product; when
    the product is singular (few samples) the root can come out non-finite, and then ``eps`` is
    added to both diagonals; a small imaginary part from round-off is dropped, a large one is an
    error. ``method='eigh'`` uses that ``sigma1 sigma2`` has the eigenvalues of the symmetric
    ``sigma1^(1/2) sigma2 sigma1^(1/2)``, so two symmetric eigendecompositions give the trace:
    the same value, several times faster for 2048-d Inception features on a CPU.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two gaussians have different dimensions")
    if method == "sqrtm":
        trace_root = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    elif method == "eigh":
        trace_root = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)


def _trace_sqrt_product_sqrtm(sigma1, sigma2, eps):
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        offset = np.eye(sigma1.shape[0]) * eps
        root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise ValueError(f"matrix square root has a large imaginary part "
                             f"({np.abs(root.imag).max():.3g})")
        root = root.real
    return np.trace(root)


def _trace_sqrt_product_eigh(sigma1, sigma2):
    values, vectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    half = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    product = half @ sigma2 @ half
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    return np.sqrt(np.clip(eigenvalues, 0, None)).sum()


def frechet_distance_from_statistics(stats_a, stats_b, method="sqrtm"):
    """FID from two streams of features. Refused (``ValueError``) unless both streams hold more
    samples than the features have dimensions: with ``n <= D`` a ``D x D`` covariance has rank
    ``n - 1 < D``, is singular, and the distance depends on how the square root of a singular
    matrix is regularized rather than on the images (2048-d Inception features need 2049+)."""
    for label, stats in (("generated", stats_a), ("real", stats_b)):
        dimension = stats.dimension
        if 2 <= stats.count <= dimension:
            raise ValueError(f"FID needs more samples than feature dimensions: {stats.count} "
                             f"{label} images for {dimension}-d features make a singular "
                             f"covariance and a meaningless value; evaluate at least "
                             f"{dimension + 1} frames (more videos, max_frames, pairs)")
    return frechet_distance(*stats_a.mean_and_covariance(), *stats_b.mean_and_covariance(),
                            method=method)


# --------------------------------------------------------------------------- landmarks
def _as_landmarks(points):
    points = np.asarray(torch.as_tensor(points).detach().cpu().double()) \
        if torch.is_tensor(points) else np.asarray(points, np.float64)
    if points.ndim != 3 or points.shape[-1] != 2:
        raise ValueError(f"expected landmarks of shape T x N x 2, got {points.shape}")
    return points


def landmark_found(points):
    """``T`` booleans: True where every landmark of the frame is finite (a face was found)."""
    return np.isfinite(_as_landmarks(points)).all(axis=(1, 2))


def keypoint_distance(points_a, points_b):
    """Per-frame mean euclidean distance (pixels) between corresponding landmarks; NaN if missing."""
    a, b = _as_landmarks(points_a), _as_landmarks(points_b)
    if a.shape != b.shape:
        raise ValueError(f"landmark sets differ in shape: {a.shape} vs {b.shape}")
    distance = np.linalg.norm(a - b, axis=-1).mean(axis=-1)
    distance[~(landmark_found(a) & landmark_found(b))] = np.nan
    return distance


class NanMean:
    """Mean of a stream of per-item values, NaN items counted as missing and excluded."""

    def __init__(self):
        self.total = 0
        self.missing = 0
        self._sum = 0.0

    def update(self, values):
        values = np.asarray(torch.as_tensor(values).detach().cpu().double()).reshape(-1)
        found = np.isfinite(values)
        self.total += values.size
        self.missing += int((~found).sum())
        self._sum += float(values[found].sum())

    @property
    def value(self):
        valid = self.total - self.missing
        return self._sum / valid if valid else float("nan")

    @property
    def missing_rate(self):
        return self.missing / self.total if self.total else float("nan")


class KeypointDistance(NanMean):
    """AKD with missing-detection bookkeeping (FOMM's "missing keypoint rate" idea).

    A frame counts only where landmarks were found on both images; the others are excluded from the
    mean and reported through ``missing_rate``.
    """

    def update(self, points_a, points_b):
        super().update(keypoint_distance(points_a, points_b))


def landmark_smoothness(points, reduction="sum"):
    """SMS of seed 002, eq. 9: mean over frames of ``|(D[t-1] + D[t+1]) / 2 - D[t]|``.

    ``points`` is one video's ``T x N x 2`` landmark track. The absolute value is taken per
    coordinate and summed over all landmarks and both axes (``reduction='sum'``, the magnitude the
    paper reports) or averaged (``'mean'``, pixels per coordinate). The first and last frames have
    no two neighbours, so the mean runs over the ``T - 2`` inner frames; a triple that touches a
    frame without a face is skipped. Returns NaN if no triple is usable.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    points = _as_landmarks(points)
    if points.shape[0] < 3:
        return float("nan")
    second_difference = np.abs((points[:-2] + points[2:]) / 2.0 - points[1:-1])
    per_frame = second_difference.reshape(second_difference.shape[0], -1)
    per_frame = per_frame.sum(1) if reduction == "sum" else per_frame.mean(1)
    per_frame = per_frame[np.isfinite(per_frame)]
    return float(per_frame.mean()) if per_frame.size else float("nan")


# --------------------------------------------------------------------------- identity embeddings
def _embedding_pair(a, b, normalize):
    a = torch.as_tensor(a, dtype=torch.float64).flatten(1)
    b = torch.as_tensor(b, dtype=torch.float64, device=a.device).flatten(1)
    if a.shape != b.shape:
        raise ValueError(f"embedding batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    return a, b


def identity_distance(embedding_a, embedding_b, normalize=True):
    """Euclidean distance per pair of identity embeddings (AEID when averaged).

    ArcFace-style embeddings are compared on the unit sphere, so they are L2-normalized first by
    default; ``normalize=False`` gives the raw distance (dlib's 0.6 same-person threshold is on
    raw descriptors). NaN embeddings (no face) give NaN.
    """
    a, b = _embedding_pair(embedding_a, embedding_b, normalize)
    return (a - b).norm(dim=1)


def cosine_similarity(embedding_a, embedding_b):
    """Cosine similarity per pair of identity embeddings (CSIM when averaged)."""
    a, b = _embedding_pair(embedding_a, embedding_b, normalize=False)
    return F.cosine_similarity(a, b, dim=1)


# --------------------------------------------------------------------------- 3DMM codes
def code_distance(codes_a, codes_b, reduction="mean"):
    """Per-image L1 distance between two batches of 3DMM codes (``B x n``).

    ``reduction='mean'`` averages the absolute differences over coefficients; ``'sum'`` gives the
    L1 norm. AED uses the expression codes and APD the pose codes (seed 003, after PIRenderer).
    """
    a = torch.as_tensor(codes_a).flatten(1).double()
    b = torch.as_tensor(codes_b).flatten(1).double().to(a.device)
    if a.shape != b.shape:
        raise ValueError(f"code batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    difference = (a - b).abs()
    if reduction == "mean":
        return difference.mean(1)
    if reduction == "sum":
        return difference.sum(1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def expression_and_pose_distance(encoder, images_a, images_b, reduction="mean"):
    """``(AED, APD)`` per image: ``encoder(images)`` returns codes with ``.exp`` and ``.pose``."""
    codes_a, codes_b = encoder(images_a), encoder(images_b)
    return (code_distance(_field(codes_a, "exp"), _field(codes_b, "exp"), reduction),
            code_distance(_field(codes_a, "pose"), _field(codes_b, "pose"), reduction))


def _field(codes, name):
    if isinstance(codes, dict):
        return codes[name]
    return getattr(codes, name)


def finite_mean(values):
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan
