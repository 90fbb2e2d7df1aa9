"""3D keypoint motion of face-vid2vid (Wang et al. 2021) and MMFA: head pose -> keypoints.

The estimator E gives, per image, yaw / pitch / roll logits over 66 bins of 3 degrees, a
translation t and expression deltas delta (``modules/head_pose.py``). With the canonical
keypoints x_c (``modules/canonical_keypoints.py``) the image's keypoints are

    x = R(yaw, pitch, roll) x_c + t + delta                     (face-vid2vid eq. 1; MMFA eq. 3)

and, with a scale s (MMFA's scaled orthographic pipeline), ``x = s R x_c + t + delta`` or, with
the expression in the canonical frame as in 3DDFA's face model, ``x = s R (x_c + delta) + t``.
Jacobians (when the canonical keypoints carry them) turn with the head: ``J = s R J_c``.

Angle conventions of the reference re-implementation, reproduced here (its released checkpoints
were trained with them):

- degrees = sum_i softmax(logits)_i * i * 3 - 99 (bin centres -99 .. 96);
- radians = degrees / 180 * 3.14 (``REFERENCE_PI``; pass ``pi=math.pi`` for the exact value);
- R = R_x(pitch) R_y(yaw) R_z(roll), right-handed rotations about the x, y and z axes.

Points are normalized (x, y, z) as everywhere in the framework (``modules/coords.py``).
"""
import torch
import torch.nn.functional as F

from modules.precision import full_precision

REFERENCE_PI = 3.14     # the reference converts degrees to radians with 3.14, not math.pi
BIN_DEGREES = 3.0       # width of a head-pose bin
FIRST_BIN_DEGREES = -99.0
ANGLE_NAMES = ("yaw", "pitch", "roll")
EXPRESSION_FRAMES = ("posed", "canonical")


@full_precision   # a softmax expectation over 66 bins: 16-bit logits move it by degrees
def bins_to_degrees(logits):
    """Expected angle in degrees under the softmax of ``B x num_bins`` bin logits: ``B``."""
    probabilities = F.softmax(logits, dim=1)
    indices = torch.arange(logits.shape[1], dtype=logits.dtype, device=logits.device)
    return (probabilities * indices).sum(dim=1) * BIN_DEGREES + FIRST_BIN_DEGREES


def head_pose_degrees(pose, yaw=None, pitch=None, roll=None):
    """``{'yaw', 'pitch', 'roll'}`` in degrees (``B`` each) from an estimator's logits.

    A number given for an angle replaces the estimate for the whole batch (face-vid2vid's
    free-view control, in degrees); None keeps the estimate.
    """
    overrides = {"yaw": yaw, "pitch": pitch, "roll": roll}
    reference = pose["yaw"]
    angles = {}
    for name in ANGLE_NAMES:
        if overrides[name] is None:
            angles[name] = bins_to_degrees(pose[name])
        else:
            angles[name] = torch.full((reference.shape[0],), float(overrides[name]),
                                      dtype=reference.dtype, device=reference.device)
    return angles


def rotation_matrix(yaw, pitch, roll, pi=REFERENCE_PI):
    """R = R_x(pitch) R_y(yaw) R_z(roll) from angles in degrees (``B`` each): ``B x 3 x 3``."""
    yaw, pitch, roll = (angle / 180 * pi for angle in (yaw, pitch, roll))
    one, zero = torch.ones_like(yaw), torch.zeros_like(yaw)

    def matrix(*rows):
        return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)

    about_x = matrix((one, zero, zero),
                     (zero, torch.cos(pitch), -torch.sin(pitch)),
                     (zero, torch.sin(pitch), torch.cos(pitch)))
    about_y = matrix((torch.cos(yaw), zero, torch.sin(yaw)),
                     (zero, one, zero),
                     (-torch.sin(yaw), zero, torch.cos(yaw)))
    about_z = matrix((torch.cos(roll), -torch.sin(roll), zero),
                     (torch.sin(roll), torch.cos(roll), zero),
                     (zero, zero, one))
    return about_x @ about_y @ about_z


@full_precision   # keypoint coordinates (modules/precision.py)
def transform_keypoints(kp_canonical, rotation, translation, expression, scale=None,
                        expression_frame="posed"):
    """Posed keypoints from canonical ones.

    ``rotation`` ``B x 3 x 3``; ``translation`` ``B x 3``; ``expression`` ``B x K x 3`` (or
    ``B x 3K``); ``scale`` None (face-vid2vid) or ``B`` / ``B x 1`` (MMFA).
    ``expression_frame='posed'``: x = s R x_c + t + delta (face-vid2vid);
    ``'canonical'``: x = s R (x_c + delta) + t (3DDFA's face model).
    Returns ``{'value': B x K x 3}`` plus ``'jacobian'`` (s R J_c) when ``kp_canonical`` has one.
    """
    if expression_frame not in EXPRESSION_FRAMES:
        raise ValueError(f"unknown expression_frame {expression_frame!r}; "
                         f"expected one of {EXPRESSION_FRAMES}")
    canonical = kp_canonical["value"]
    delta = expression.reshape(canonical.shape[0], -1, 3)
    if delta.shape != canonical.shape:
        raise ValueError(f"expression deltas {tuple(expression.shape)} do not match the "
                         f"{canonical.shape[1]} canonical keypoints")
    factor = 1.0 if scale is None else scale.reshape(-1, 1, 1)
    if expression_frame == "canonical":
        canonical = canonical + delta
    value = factor * torch.einsum("bij,bkj->bki", rotation, canonical) + translation[:, None]
    if expression_frame == "posed":
        value = value + delta
    keypoints = {"value": value}
    if kp_canonical.get("jacobian") is not None:
        jacobian = rotation[:, None] @ kp_canonical["jacobian"]
        keypoints["jacobian"] = jacobian if scale is None else factor[..., None] * jacobian
    return keypoints


def pose_keypoints(kp_canonical, pose, yaw=None, pitch=None, roll=None, pi=REFERENCE_PI,
                   scale=None, expression_frame="posed"):
    """face-vid2vid's keypoint transformation: canonical keypoints + estimator output -> keypoints.

    ``pose`` is :class:`~modules.head_pose.HeadPoseEstimator`'s output (logits, ``t``, ``exp``);
    ``yaw``/``pitch``/``roll`` (degrees) override the estimated angles (free view). ``pose`` is
    not modified (the reference reshapes ``pose['t']`` in place; this does not).
    """
    degrees = head_pose_degrees(pose, yaw=yaw, pitch=pitch, roll=roll)
    rotation = rotation_matrix(degrees["yaw"], degrees["pitch"], degrees["roll"], pi=pi)
    return transform_keypoints(kp_canonical, rotation, pose["t"], pose["exp"], scale=scale,
                               expression_frame=expression_frame)


__all__ = ["REFERENCE_PI", "BIN_DEGREES", "FIRST_BIN_DEGREES", "ANGLE_NAMES", "bins_to_degrees",
           "head_pose_degrees", "rotation_matrix", "transform_keypoints", "pose_keypoints"]
