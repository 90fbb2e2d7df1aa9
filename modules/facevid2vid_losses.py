"""face-vid2vid's keypoint and head-pose losses (Wang et al. 2021, section 3.3), pure functions;
MMFA uses the same keypoint and deformation priors. The loss weights are applied by the caller.

- keypoint prior L_P: keypoints kept apart and at a mean depth,
      sum_{i,j} mean_b max(0, D_t - ||x_i - x_j||^2) + mean_b |mean_k z_k - z_t|
  with D_t = 0.1 and z_t = 0.33. As the reference, the sum runs over all ordered pairs including
  i = j (each such pair adds D_t, a constant) and the distance is ``F.pairwise_distance``'s,
  which adds ``eps`` = 1e-6 to every coordinate difference.
- head-pose loss L_H: sum over yaw, pitch, roll of mean_b |angle - angle_ref| in degrees, the
  reference angles from a frozen Hopenet (``modules/hopenet.py``).
- deformation prior L_Delta: mean_b ||delta||_1 of the expression deltas.
"""
import torch

from modules.hopenet import hopenet_input
from modules.keypoints_3d import ANGLE_NAMES, bins_to_degrees
from modules.precision import full_precision

DISTANCE_THRESHOLD = 0.1   # D_t
DEPTH_TARGET = 0.33        # z_t
PAIRWISE_EPS = 1e-6        # F.pairwise_distance's default eps, added to the differences


@full_precision   # squared distances against a 0.1 threshold: 16-bit rounding is ~1e-3 each
def keypoint_prior_loss(kp_value, distance_threshold=DISTANCE_THRESHOLD, depth_target=DEPTH_TARGET,
                        eps=PAIRWISE_EPS):
    """L_P of keypoints ``B x K x 3`` (a scalar)."""
    differences = kp_value[:, :, None, :] - kp_value[:, None, :, :] + eps     # B x K x K x 3
    squared = differences.pow(2).sum(-1)
    separation = torch.relu(distance_threshold - squared).mean(dim=0).sum()
    depth = (kp_value[..., 2].mean(dim=-1) - depth_target).abs().mean()
    return separation + depth


def hopenet_degrees(hopenet, image):
    """Reference head pose of images in [0, 1]: ``{'yaw', 'pitch', 'roll'}`` in degrees (``B``
    each), from a frozen Hopenet; no gradient."""
    with torch.no_grad():
        logits = hopenet(hopenet_input(image))
    return {name: bins_to_degrees(value) for name, value in zip(ANGLE_NAMES, logits)}


def head_pose_loss(pose, reference_degrees):
    """L_H: ``pose`` holds the estimator's yaw/pitch/roll logits; ``reference_degrees`` the
    reference angles (:func:`hopenet_degrees`)."""
    return sum((bins_to_degrees(pose[name]) - reference_degrees[name].detach()).abs().mean()
               for name in ANGLE_NAMES)


def expression_loss(expression):
    """L_Delta: mean over the batch of the L1 norm of the expression deltas (``B x 3K`` or
    ``B x K x 3``)."""
    return expression.flatten(1).abs().sum(dim=1).mean()


__all__ = ["DISTANCE_THRESHOLD", "DEPTH_TARGET", "keypoint_prior_loss", "hopenet_degrees",
           "head_pose_loss", "expression_loss"]
