"""The project's face-landmark layouts: iBUG 68 points and the 74-point layout (68 + lids + pupils).

74-point layout (what the landmark detector predicts and the synthetic dataset writes)::

    0-67   the 68 iBUG points, in iBUG order (0-16 jaw, 17-21 right brow, 22-26 left brow,
           27-35 nose, 36-41 right eye, 42-47 left eye, 48-59 outer lip, 60-67 inner lip)
    68     right eye, upper-lid midpoint          (WFLW 62)
    69     right eye, lower-lid midpoint          (WFLW 66)
    70     left eye, upper-lid midpoint           (WFLW 70)
    71     left eye, lower-lid midpoint           (WFLW 74)
    72     right pupil                            (WFLW 96)
    73     left pupil                             (WFLW 97)

"Left" and "right" are the subject's (iBUG's convention: the right eye, 36-41, is on the image's
left for a face looking at the camera). The sparse-to-dense paper adds "eye pupils" to reach 74
points without listing the other four; WFLW, the data its detector is trained on, annotates eight
points per eye of which iBUG uses six, so the two unused lid midpoints of each eye plus the two
pupils are the six points a WFLW-trained 74-point detector can learn (and they help with blinks
and gaze, what the extra points are for).

Landmark arrays are ``... x N x 2`` (x, y), N = 68 or 74; a 68-point array (FAN or dlib
detections) is a valid input wherever the first 68 points suffice, and :func:`pad_to_layout` marks
the six missing points NaN ("not annotated") where 74 are expected.
"""
import numpy as np
import torch

NUM_IBUG = 68
NUM_LANDMARKS = 74
LAYOUTS = (NUM_IBUG, NUM_LANDMARKS)
EXTRA_LANDMARK_NAMES = ("right_upper_lid", "right_lower_lid", "left_upper_lid", "left_lower_lid",
                        "right_pupil", "left_pupil")
RIGHT_UPPER_LID, RIGHT_LOWER_LID, LEFT_UPPER_LID, LEFT_LOWER_LID, RIGHT_PUPIL, LEFT_PUPIL = \
    range(NUM_IBUG, NUM_LANDMARKS)

# ----------------------------------------------------------------------------- regions
RIGHT_BROW = tuple(range(17, 22))
LEFT_BROW = tuple(range(22, 27))
RIGHT_EYE = tuple(range(36, 42))
LEFT_EYE = tuple(range(42, 48))
MOUTH = tuple(range(48, 68))                                        # outer + inner lip
# the local regions of the sparse-to-dense motion network (M_L1, M_L2, M_L3), 74-point indices
LEFT_EYE_BROW = LEFT_BROW + LEFT_EYE + (LEFT_UPPER_LID, LEFT_LOWER_LID, LEFT_PUPIL)
RIGHT_EYE_BROW = RIGHT_BROW + RIGHT_EYE + (RIGHT_UPPER_LID, RIGHT_LOWER_LID, RIGHT_PUPIL)
LOCAL_REGIONS = {"left_eye_brow": LEFT_EYE_BROW, "right_eye_brow": RIGHT_EYE_BROW,
                 "mouth": MOUTH}


def check_layout(num_landmarks):
    if num_landmarks not in LAYOUTS:
        raise ValueError(f"landmark arrays must hold 68 (iBUG) or 74 (iBUG + lids + pupils) "
                         f"points, got {num_landmarks}; convert other layouts first (e.g. "
                         f"datasets/wflw.py for WFLW's 98 points)")
    return num_landmarks


def region_indices(region, num_landmarks=NUM_LANDMARKS):
    """Indices of a local region (``LOCAL_REGIONS`` key) that exist in an N-point layout."""
    check_layout(num_landmarks)
    if region not in LOCAL_REGIONS:
        raise ValueError(f"unknown landmark region {region!r}; expected one of "
                         f"{list(LOCAL_REGIONS)}")
    return tuple(i for i in LOCAL_REGIONS[region] if i < num_landmarks)


def ibug68(points):
    """The 68 iBUG points of a 68- or 74-point array ``... x N x 2`` (what 68-point consumers,
    such as the 3DMM landmark loss or AKD against FAN/dlib, compare)."""
    check_layout(points.shape[-2])
    return points[..., :NUM_IBUG, :]


def pad_to_layout(points, num_landmarks=NUM_LANDMARKS):
    """A 68-point array extended to ``num_landmarks`` points with NaN (not annotated) rows.

    Works on numpy arrays and torch tensors; a 74-point array asked for 74 is returned as is.
    """
    have = check_layout(points.shape[-2])
    check_layout(num_landmarks)
    if have == num_landmarks:
        return points
    if have > num_landmarks:
        return points[..., :num_landmarks, :]
    shape = points.shape[:-2] + (num_landmarks - have, points.shape[-1])
    if torch.is_tensor(points):
        pad = torch.full(shape, float("nan"), dtype=points.dtype, device=points.device)
        return torch.cat([points, pad], dim=-2)
    return np.concatenate([points, np.full(shape, np.nan, dtype=points.dtype)], axis=-2)


def flatten_landmarks(points):
    """The landmark vector of the sparse-to-dense networks: ``B x N x 2`` -> ``B x 2N``
    (x0, y0, x1, y1, ...), coordinates normalized to [-1, 1]."""
    return points.reshape(points.shape[0], -1)


__all__ = ["NUM_IBUG", "NUM_LANDMARKS", "EXTRA_LANDMARK_NAMES", "RIGHT_BROW", "LEFT_BROW",
           "RIGHT_EYE", "LEFT_EYE", "MOUTH", "LEFT_EYE_BROW", "RIGHT_EYE_BROW", "LOCAL_REGIONS",
           "check_layout", "region_indices", "ibug68", "pad_to_layout", "flatten_landmarks"]
