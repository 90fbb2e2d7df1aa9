"""The face-landmark detector of the sparse-to-dense paper (section 3.3): FAN + DSNT + SBR.

* FAN (Bulat and Tzimiropoulos 2017): a stem taking the image to quarter resolution, then
  ``num_stacks`` stacked hourglasses (``modules.blocks.ResidualHourglass`` of FAN's hierarchical
  blocks), each followed by a 1x1 head giving one heatmap per landmark; the features and heatmaps
  of each stack are fed back into the next (intermediate supervision). FAN4 = 4 stacks.
* DSNT (Nibali et al. 2018): each heatmap becomes a distribution by a spatial softmax and the
  landmark is its expected coordinate (``modules.util.heatmap_means``): differentiable, no
  parameters, sub-pixel. Trained with the Euclidean distance to the target plus DSNT's
  regularization of the heatmap's shape (Jensen-Shannon divergence to a Gaussian at the target,
  the variant the DSNT paper recommends; or its variance regularizer).
* SBR (Dong et al. 2018): on unlabelled video, a detection at frame t tracked to frame t+1 by
  Lucas-Kanade (``modules/optical_flow.py``) must land on the detection at t+1, and a detection
  at t+1 tracked back to t on the detection at t (forward and backward registration).

Landmarks are normalized (x, y) in [-1, 1] (``modules/coords.py``), 74 points by default
(``modules/landmark_layout.py``); NaN targets (points a dataset does not annotate) are ignored.
"""
import torch
import torch.nn.functional as F
from torch import nn

from modules.blocks import HierarchicalBlock, ResidualHourglass, make_norm
from modules.coords import make_coordinate_grid
from modules.landmark_layout import NUM_LANDMARKS
from modules.optical_flow import LucasKanadeTracker
from modules.util import heatmap_means, kp2gaussian

DSNT_REGULARIZERS = ("js", "variance", "none")


# ----------------------------------------------------------------------------- network
class LandmarkDetector(nn.Module):
    """FAN-style stacked hourglass with a DSNT output.

    ``forward(image B x 3 x H x W)`` -> ``{'value': B x K x 2`` (last stack),
    ``'heatmaps': [B x K x H/4 x W/4 per stack]`` (softmax-normalized, each sums to 1),
    ``'stack_values': [B x K x 2 per stack]}``. Image sides must be divisible by
    ``4 * 2^depth``. FAN4 at 256 x 256: ``features=256, num_stacks=4, depth=4`` (the defaults).
    """

    def __init__(self, num_landmarks=NUM_LANDMARKS, num_channels=3, features=256, num_stacks=4,
                 depth=4, norm="batch"):
        super().__init__()
        self.num_landmarks, self.depth = num_landmarks, depth
        quarter = features // 2
        self.stem = nn.Sequential(
            nn.Conv2d(num_channels, features // 4, kernel_size=7, stride=2, padding=3),
            make_norm(features // 4, norm), nn.ReLU(),
            HierarchicalBlock(features // 4, quarter, norm), nn.AvgPool2d(2),
            HierarchicalBlock(quarter, quarter, norm), HierarchicalBlock(quarter, features, norm))
        self.hourglasses = nn.ModuleList(ResidualHourglass(features, depth, norm)
                                         for _ in range(num_stacks))
        self.stack_features = nn.ModuleList(
            nn.Sequential(HierarchicalBlock(features, features, norm),
                          nn.Conv2d(features, features, 1), make_norm(features, norm), nn.ReLU())
            for _ in range(num_stacks))
        self.heatmap_heads = nn.ModuleList(nn.Conv2d(features, num_landmarks, 1)
                                           for _ in range(num_stacks))
        self.feature_returns = nn.ModuleList(nn.Conv2d(features, features, 1)
                                             for _ in range(num_stacks - 1))
        self.heatmap_returns = nn.ModuleList(nn.Conv2d(num_landmarks, features, 1)
                                             for _ in range(num_stacks - 1))

    def check_size(self, image):
        multiple = 4 * 2 ** self.depth
        if image.shape[-2] % multiple or image.shape[-1] % multiple:
            raise ValueError(f"the landmark detector needs image sides divisible by {multiple} "
                             f"(4 x 2^depth); got {tuple(image.shape[-2:])}: resize the frames")

    def forward(self, image):
        self.check_size(image)
        x = self.stem(image)
        heatmaps, values = [], []
        for stack, hourglass in enumerate(self.hourglasses):
            features = self.stack_features[stack](hourglass(x))
            logits = self.heatmap_heads[stack](features)
            distribution = spatial_softmax(logits)
            heatmaps.append(distribution)
            values.append(heatmap_means(distribution))                       # DSNT
            if stack < len(self.hourglasses) - 1:
                x = x + self.feature_returns[stack](features) + self.heatmap_returns[stack](logits)
        return {"value": values[-1], "heatmaps": heatmaps, "stack_values": values}


def spatial_softmax(logits):
    """DSNT's normalization: a softmax over the pixels of each map, ``B x K x H x W``."""
    batch, channels, height, width = logits.shape
    return F.softmax(logits.flatten(2), dim=2).view(batch, channels, height, width)


# ----------------------------------------------------------------------------- DSNT losses
def target_distribution(target, spatial_size, sigma):
    """Normalized Gaussians ``B x K x H x W`` centred on ``target`` (``B x K x 2``, finite),
    standard deviation ``sigma`` heatmap pixels."""
    height, width = spatial_size
    pixel = 2.0 / (max(height, width) - 1)                               # square heatmaps
    gaussian = kp2gaussian(target, spatial_size, variance=(sigma * pixel) ** 2)
    return gaussian / gaussian.flatten(2).sum(-1).clamp_min(1e-12)[..., None, None]


def js_divergence(p, q, eps=1e-12):
    """Jensen-Shannon divergence of distributions over the last two dims: ``B x K``."""
    p, q = p.flatten(2), q.flatten(2)
    middle = 0.5 * (p + q)
    kl = lambda a: (a * (torch.log(a + eps) - torch.log(middle + eps))).sum(-1)  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


def heatmap_variance(heatmaps):
    """Variance of x and of y under each heatmap, ``B x K x 2`` (normalized units)."""
    grid = make_coordinate_grid(*heatmaps.shape[-2:], dtype=heatmaps.dtype, device=heatmaps.device)
    mean = heatmap_means(heatmaps)
    second = torch.einsum("bkhw,hwc->bkc", heatmaps, grid ** 2)
    return second - mean ** 2


def dsnt_regularization(heatmaps, target, sigma=1.0, kind="js"):
    """DSNT's heatmap regularizer, ``B x K``: 'js' = JS(heatmap || N(target, sigma^2)) or
    'variance' = sum over x, y of (Var - sigma^2)^2 (normalized units); 'none' = 0."""
    if kind not in DSNT_REGULARIZERS:
        raise ValueError(f"unknown DSNT regularizer {kind!r}; expected one of {DSNT_REGULARIZERS}")
    if kind == "none":
        return heatmaps.new_zeros(heatmaps.shape[:2])
    if kind == "js":
        return js_divergence(heatmaps, target_distribution(target, heatmaps.shape[-2:], sigma))
    pixel = 2.0 / (max(heatmaps.shape[-2:]) - 1)
    return ((heatmap_variance(heatmaps) - (sigma * pixel) ** 2) ** 2).sum(-1)


def landmark_regression_loss(prediction, target, regularizer="js", sigma=1.0,
                             regularization_weight=1.0):
    """DSNT's loss summed over the stacks (FAN's intermediate supervision): per landmark the
    Euclidean distance ``|mu - y|`` plus ``regularization_weight`` x the heatmap regularizer,
    averaged over the annotated landmarks (finite target rows).

    ``prediction``: the detector's output dict; ``target``: ``B x K x 2`` normalized, NaN rows
    for points without annotation (a 68-point file padded to 74, a face not found).
    """
    valid = torch.isfinite(target).all(-1)                                   # B x K
    count = valid.sum().clamp_min(1)
    target = torch.nan_to_num(target)
    total = target.new_zeros(())
    for heatmaps, values in zip(prediction["heatmaps"], prediction["stack_values"]):
        distance = (values - target).pow(2).sum(-1).add(1e-12).sqrt()
        regular = dsnt_regularization(heatmaps, target, sigma, regularizer)
        total = total + ((distance + regularization_weight * regular) * valid).sum() / count
    return total


# ----------------------------------------------------------------------------- SBR
def track_pairs(tracker, points, frames, forward=True):
    """Points of frames t tracked to t+1 (``forward``) or of t+1 back to t.

    ``points``: ``B x T x K x 2`` (the starting points per frame), ``frames``:
    ``B x T x C x H x W``; returns ``B x (T-1) x K x 2``: for forward, entry t is frame t's points
    in frame t+1; for backward, frame t+1's points in frame t.
    """
    batch, steps = points.shape[:2]
    early, late = slice(0, steps - 1), slice(1, steps)
    start, stop = (early, late) if forward else (late, early)
    moved = tracker(merge_time(points[:, start]), merge_time(frames[:, start]),
                    merge_time(frames[:, stop]))
    return moved.view(batch, steps - 1, *points.shape[2:])


def merge_time(x):
    """``B x T x ...`` -> ``(B T) x ...``."""
    return x.reshape(-1, *x.shape[2:])


def registration_loss(detections, frames, tracker=None, fb_threshold=1.0):
    """SBR's registration loss on a clip: detections ``B x T x K x 2`` of frames
    ``B x T x C x H x W``.

    forward:   LK_{t->t+1}(x_t) should equal x_{t+1}
    backward:  LK_{t+1->t}(x_{t+1}) should equal x_t
    L = mean over t, k of beta_{t,k} (|LK_{t->t+1}(x_t) - x_{t+1}|^2
                                      + |LK_{t+1->t}(x_{t+1}) - x_t|^2)

    Gradients flow into the detections on both sides (through the tracker into the starting
    points). ``beta``: SBR's reliability check, 1 where the optical flow itself is consistent
    (x_t tracked forward and back again returns within ``fb_threshold`` pixels of the frame), 0
    elsewhere (occlusions, textureless windows); None keeps every point. Squared distances are in
    normalized units. Zero when the detections move exactly as the tracker follows the video.
    """
    if detections.shape[1] < 2:
        raise ValueError(f"the registration loss needs clips of at least 2 frames, got "
                         f"{detections.shape[1]}")
    tracker = tracker or LucasKanadeTracker()
    forward = track_pairs(tracker, detections, frames, forward=True)       # x_t in frame t+1
    backward = track_pairs(tracker, detections, frames, forward=False)     # x_{t+1} in frame t
    error = ((forward - detections[:, 1:]).pow(2).sum(-1)
             + (backward - detections[:, :-1]).pow(2).sum(-1))               # B x (T-1) x K
    if fb_threshold is not None:
        error = error * flow_reliability(tracker, detections, frames, forward, fb_threshold)
    return error.mean()


@torch.no_grad()
def flow_reliability(tracker, detections, frames, forward, threshold):
    """SBR's beta: 1 where tracking x_t forward and back again ends within ``threshold`` pixels
    of x_t, ``B x (T-1) x K``."""
    height, width = frames.shape[-2:]
    back = tracker(merge_time(forward.detach()), merge_time(frames[:, 1:]),
                   merge_time(frames[:, :-1])).view_as(forward)
    pixels = detections.new_tensor([(width - 1) / 2, (height - 1) / 2])
    round_trip = ((back - detections[:, :-1]) * pixels).norm(dim=-1)
    return (round_trip <= threshold).to(detections.dtype)


__all__ = ["LandmarkDetector", "spatial_softmax", "target_distribution", "js_divergence",
           "heatmap_variance", "dsnt_regularization", "landmark_regression_loss",
           "registration_loss", "flow_reliability", "track_pairs", "DSNT_REGULARIZERS"]
