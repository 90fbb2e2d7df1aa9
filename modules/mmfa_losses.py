"""MMFA's own training objectives (seed 004, section 3.2 and appendix A.2). The loss weights are
applied by the model.

- :func:`random_similarity`: the augmentation of the self-supervised representation loss, a
  random rotation, scaling and translation of the image plane (no thin-plate warp: the
  expression must survive it unchanged).
- :func:`representation_loss` (eq. 7): 1 - cos(epsilon(D), epsilon(D_aug)), averaged over the
  batch. The paper "maximizes the cosine similarity"; 1 - cos is that with a minimum of 0.
- :func:`identity_consistency_loss` (eq. 8): mean |x_c(S) - x_c(D)| of the canonical keypoints of
  source and driving frame (same person). The equation did not survive in our copy of the paper;
  L1 is our choice, as in the keypoint losses it sits beside.
- :class:`LandmarkObjective` (eq. 9): a frozen landmark detector on the generated and the driving
  frame, |l(D_hat) - l(D)| weighted per face part. The paper's detector finds 145 points with the
  pupils; ours is the project's 74-point FAN + DSNT detector (``modules/landmark_detector.py``:
  iBUG 68 + lids + pupils), and its three parts are the contour and nose, the brows and eyes
  (lids and pupils), and the mouth.
- :class:`MultiScalePerceptual` (eq. 6): the VGG-19 perceptual pyramid of every generator output
  against the ground truth shrunk to that output's size. The VGG-Face term the appendix adds on
  the finest output is not implemented: no VGG-Face weights are available to this project.
"""
import math

import torch

from modules.landmark_detector import LandmarkDetector
from modules.landmark_layout import LEFT_EYE_BROW, MOUTH, NUM_LANDMARKS, RIGHT_EYE_BROW
from modules.objectives import VGG19_MIN_SIZE, PerceptualPyramid
from modules.util import ImagePyramid, RandomTransform
from modules.weights_file import load_weights_file

LANDMARK_PARTS = {
    "contour": tuple(range(0, 17)) + tuple(range(27, 36)),     # jaw line and nose
    "eyes": RIGHT_EYE_BROW + LEFT_EYE_BROW,                    # brows, eyes, lids, pupils
    "mouth": MOUTH,
}


# ----------------------------------------------------------------------------- representation
def random_similarity(batch_size, max_rotation=30.0, scale_range=(0.8, 1.2),
                      max_translation=0.1, dtype=torch.float32, device=None, generator=None):
    """A :class:`RandomTransform` of a random similarity per sample: rotation uniform in
    +-``max_rotation`` degrees, scale uniform in ``scale_range``, translation uniform in
    +-``max_translation`` (normalized units) along x and y."""
    def uniform(low, high):
        draw = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        return (low + (high - low) * draw).to(dtype=dtype, device=device)

    angle = uniform(-max_rotation, max_rotation) * math.pi / 180
    scale = uniform(*scale_range)
    shift_x, shift_y = uniform(-max_translation, max_translation), \
        uniform(-max_translation, max_translation)
    cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
    affine = torch.stack([torch.stack([cos, -sin, shift_x], dim=1),
                          torch.stack([sin, cos, shift_y], dim=1)], dim=1)       # B x 2 x 3
    return RandomTransform.from_parameters(affine)


def representation_loss(feature, augmented_feature):
    """Eq. 7: mean over the batch of 1 - cos(epsilon, epsilon_aug)."""
    return (1 - torch.cosine_similarity(feature, augmented_feature, dim=1)).mean()


def identity_consistency_loss(kp_canonical_source, kp_canonical_driving):
    """Eq. 8: mean |x_c(S) - x_c(D)| over keypoints, coordinates and the batch."""
    return (kp_canonical_source["value"] - kp_canonical_driving["value"]).abs().mean()


# ----------------------------------------------------------------------------- landmarks
MISSING_DETECTOR = ("MMFA's landmark loss needs a trained landmark detector: set "
                    "model_params.landmark_params.checkpoint (or, for tests and smoke runs only, "
                    "landmark_params.pretrained: false; or loss_weights.landmark: 0)")

def landmark_weights(part_weights, num_landmarks=NUM_LANDMARKS):
    """Per-landmark weights ``num_landmarks`` from ``{'contour', 'eyes', 'mouth'}`` weights."""
    unknown = set(part_weights) - set(LANDMARK_PARTS)
    if unknown:
        raise ValueError(f"unknown landmark parts {sorted(unknown)}; expected "
                         f"{sorted(LANDMARK_PARTS)}")
    weights = torch.zeros(num_landmarks)
    for part, indices in LANDMARK_PARTS.items():
        weights[[i for i in indices if i < num_landmarks]] = float(part_weights.get(part, 0.0))
    return weights


def load_landmark_detector_state(path, detector):
    """Weights for a :class:`LandmarkDetector` from a plain state-dict file or a framework
    checkpoint holding one (its entries found under whatever prefix they have)."""
    state = load_weights_file(
        path, "landmark detector weights", "MMFA's landmark loss needs a trained 74-point detector "
        "(modules/landmark_detector.py); set model_params.landmark_params.checkpoint, or "
        "loss_weights.landmark to 0")
    state = state.get("state_dict", state)
    anchor = "stem.0.weight"
    prefixes = [key[:-len(anchor)] for key in state if key.endswith(anchor)]
    if not prefixes:
        raise ValueError(f"{path} holds no landmark detector weights (no '*{anchor}' entry)")
    prefix = prefixes[0]
    detector.load_state_dict({key[len(prefix):]: value for key, value in state.items()
                              if key.startswith(prefix)})


class LandmarkObjective:
    """Eq. 9 with a frozen landmark detector: sum over landmarks of ``w_i |l_i(D_hat) - l_i(D)|``
    (L1 over x and y, normalized coordinates) divided by the sum of the weights, averaged over the
    batch. Gradients flow through the detector into the generated frame only.

    Not a module: the detector is a loss network from its own file (``checkpoint``), loaded on
    first use, never in the model's state dict or optimizers. ``pretrained=False`` uses a fixed,
    seeded random detector instead (tests and smoke runs only).
    """

    def __init__(self, detector_params, part_weights, checkpoint=None, pretrained=True):
        self.detector_params = dict(detector_params)
        self.weights = landmark_weights(part_weights, self.detector_params["num_landmarks"])
        self.checkpoint, self.pretrained = checkpoint, pretrained
        self.detectors = {}

    def detector(self, like):
        key = (str(like.device), like.dtype)
        if key not in self.detectors:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                detector = LandmarkDetector(**self.detector_params)
            if self.pretrained:
                if not self.checkpoint:
                    raise ValueError(MISSING_DETECTOR)
                load_landmark_detector_state(self.checkpoint, detector)
            for parameter in detector.parameters():
                parameter.requires_grad_(False)
            self.detectors[key] = detector.to(device=like.device, dtype=like.dtype).eval()
        return self.detectors[key]

    def __call__(self, generated, driving):
        detector = self.detector(generated)
        predicted = detector(generated)["value"]
        with torch.no_grad():
            target = detector(driving)["value"]
        weights = self.weights.to(device=generated.device, dtype=generated.dtype)
        per_point = (predicted - target).abs().sum(-1)                         # B x K
        return (per_point * weights).sum(-1).mean() / weights.sum().clamp_min(1e-12)


# ----------------------------------------------------------------------------- perceptual
class MultiScalePerceptual:
    """Eq. 6: sum over the generator's outputs of the perceptual pyramid of output i against the
    ground truth at output i's size. Each output uses the pyramid scales of ``train_params``
    that keep it at least 16 pixels (VGG-19's four pools); an output too small for any is left
    out."""

    def __init__(self, train_params, frame_size, output_sizes):
        weights = train_params["loss_weights"]["perceptual"]
        self.levels = []
        for size in output_sizes:
            scales = [s for s in train_params["scales"] if size * s >= VGG19_MIN_SIZE]
            if not scales or not any(weights):
                continue
            pyramid = PerceptualPyramid(scales, weights, train_params["perceptual_weights_path"],
                                        train_params["perceptual_pretrained"])
            self.levels.append((size, pyramid, ImagePyramid([size / frame_size])))

    def __bool__(self):
        return bool(self.levels)

    def __call__(self, predictions, target):
        by_size = {image.shape[-1]: image for image in predictions}
        total = target.new_zeros(())
        for size, perceptual, shrink in self.levels:
            shrink.to(target.device)
            total = total + perceptual(by_size[size], next(iter(shrink(target).values())))
        return total


__all__ = ["LANDMARK_PARTS", "MISSING_DETECTOR", "random_similarity", "representation_loss",
           "identity_consistency_loss", "landmark_weights", "load_landmark_detector_state",
           "LandmarkObjective", "MultiScalePerceptual"]
