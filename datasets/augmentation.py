"""Augmentation of a (source, driving) frame pair that keeps sidecar annotations consistent.

A horizontal flip mirrors the frames, mirrors landmark x coordinates AND swaps the left/right
landmark indices of the 68-point scheme (a mirrored right eye corner is a left eye corner), and of
the 74-point layout (``modules/landmark_layout.py``: also the lid midpoints and the pupils); FLAME
codes are mirrored approximately (rotations and x translation; shape and expression coefficients
are kept, since FLAME's bases are not exactly symmetric); parsing maps are mirrored. The same
random parameters apply to both frames of the pair, as they come from one video.
"""
import numpy as np


def _mirror_pairs():
    """Index pairs (i, j) of the iBUG 68-point scheme that swap under a horizontal flip."""
    pairs = [(i, 16 - i) for i in range(8)]                         # jaw contour 0-16
    pairs += [(17 + i, 26 - i) for i in range(5)]                   # brows 17-21 <-> 26-22
    pairs += [(31, 35), (32, 34)]                                   # nostrils
    pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    pairs += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]     # outer lip
    pairs += [(60, 64), (61, 63), (65, 67)]                         # inner lip
    return pairs


# points 68-73 of the 74-point layout: right/left upper lid, right/left lower lid, pupils
EXTRA_MIRROR_PAIRS = [(68, 70), (69, 71), (72, 73)]


def landmark_flip_permutation(num_landmarks=68):
    """Index map of a horizontal flip for the 68-point scheme or the 74-point layout."""
    if num_landmarks not in (68, 74):
        raise ValueError(f"no horizontal-flip index map for {num_landmarks} landmarks; "
                         f"expected 68 or 74 (modules/landmark_layout.py)")
    perm = np.arange(num_landmarks)
    pairs = _mirror_pairs() + (EXTRA_MIRROR_PAIRS if num_landmarks == 74 else [])
    for i, j in pairs:
        perm[i], perm[j] = j, i
    return perm


LANDMARK_FLIP = landmark_flip_permutation()
LANDMARK_FLIP_74 = landmark_flip_permutation(74)
LANDMARK_FLIPS = {68: LANDMARK_FLIP, 74: LANDMARK_FLIP_74}


def flip_landmarks(points, width):
    """Mirror N x 2 pixel landmarks (N = 68 or 74) of a frame ``width`` pixels wide and relabel
    left/right."""
    flipped = np.array(points, dtype=np.float32, copy=True)
    if len(flipped) not in LANDMARK_FLIPS:
        raise ValueError(f"cannot flip {len(flipped)} landmarks: the horizontal flip knows the "
                         f"68-point and the 74-point layouts (modules/landmark_layout.py)")
    flipped[:, 0] = (width - 1) - flipped[:, 0]
    return flipped[LANDMARK_FLIPS[len(flipped)]]


def flip_flame(codes):
    """Approximate mirror of FLAME codes: axis-angle (wx, wy, wz) -> (wx, -wy, -wz), tx -> -tx."""
    out = {k: np.array(v, copy=True) for k, v in codes.items()}
    pose = out["pose"].reshape(-1, 3)
    pose[:, 1:] *= -1.0
    out["pose"] = pose.reshape(out["pose"].shape)
    out["cam"][1] *= -1.0  # cam = (scale, tx, ty)
    return out


def _jitter(frames, params, rng):
    """Color jitter (brightness, contrast, saturation, hue), one draw for the whole pair.

    Works on channel planes (3 x H x W float32): every step is a few whole-array operations, so
    a 256 x 256 frame costs milliseconds."""
    brightness = 1.0 + rng.uniform(-params["brightness"], params["brightness"])
    contrast = 1.0 + rng.uniform(-params["contrast"], params["contrast"])
    saturation = 1.0 + rng.uniform(-params["saturation"], params["saturation"])
    hue = rng.uniform(-params["hue"], params["hue"])
    out = []
    for frame in frames:
        x = np.moveaxis(frame, -1, 0).astype(np.float32) / 255.0 * brightness    # 3 x H x W
        mean = x.mean()
        x = (x - mean) * contrast + mean
        gray = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]                       # ITU-R 601 luma
        x = (x - gray) * saturation + gray
        if hue:
            x = shift_hue(np.clip(x, 0.0, 1.0), hue)
        x = (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        out.append(np.ascontiguousarray(np.moveaxis(x, 0, -1)))
    return out


def shift_hue(planes, shift):
    """Rotate the HSV hue of 3 x H x W RGB planes in [0, 1] by ``shift`` turns, keeping S and V.

    Closed form of RGB -> HSV -> RGB: the hue h in [0, 6) comes from the largest channel, and
    each output channel is V - V S clip(min(k, 4 - k), 0, 1) with k = (n + h') mod 6, n = 5, 3, 1
    for R, G, B (V = max, V S = max - min). Gray pixels (max = min) keep their value."""
    red, green, blue = planes
    top = np.maximum(np.maximum(red, green), blue)                            # V
    spread = top - np.minimum(np.minimum(red, green), blue)                   # V S
    inverse = np.divide(1.0, spread, out=np.zeros_like(spread), where=spread > 0)
    hue = np.where(top == red, (green - blue) * inverse,
                   np.where(top == green, (blue - red) * inverse + 2, (red - green) * inverse + 4))
    hue += np.float32(6.0 * shift)
    out = np.empty_like(planes)
    for channel, n in enumerate((5, 3, 1)):
        k = np.mod(hue + n, 6, dtype=np.float32)
        np.minimum(k, 4 - k, out=k)
        np.clip(k, 0, 1, out=k)
        np.subtract(top, spread * k, out=out[channel])
    return out


def augment_frames(frames, params, rng, landmarks=None, flame=None, parsing=None):
    """Apply the config's ``augmentation_params`` to frames of one video and their annotations
    (per-frame lists, or None): ``{'frames', 'landmarks', 'flame', 'parsing'}``.

    Parsing maps (``H x W`` label arrays, ``modules/face_parsing.py``) follow the time and the
    horizontal flip; their ids need no relabelling (left and right parts share an id) and the
    color jitter leaves them alone.
    """
    flip = params.get("flip_param") or {}
    annotations = {"landmarks": landmarks, "flame": flame, "parsing": parsing}
    if flip.get("time_flip") and rng.rand() < 0.5:
        frames = frames[::-1]
        annotations = {k: v[::-1] if v is not None else None for k, v in annotations.items()}
    if flip.get("horizontal_flip") and rng.rand() < 0.5:
        width = frames[0].shape[1]
        frames = [np.ascontiguousarray(f[:, ::-1]) for f in frames]
        mirror = {"landmarks": lambda p: flip_landmarks(p, width), "flame": flip_flame,
                  "parsing": lambda m: np.ascontiguousarray(m[:, ::-1])}
        annotations = {k: [mirror[k](a) for a in v] if v is not None else None
                       for k, v in annotations.items()}
    jitter = params.get("jitter_param")
    if jitter and any(jitter.values()):
        frames = _jitter(list(frames), jitter, rng)
    out = {k: list(v) if v is not None else None for k, v in annotations.items()}
    out["frames"] = list(frames)
    return out


def augment_pair(frames, landmarks, flame, params, rng):
    """:func:`augment_frames` for frames with landmarks and FLAME codes:
    ``(frames, landmarks, flame)``."""
    out = augment_frames(frames, params, rng, landmarks, flame)
    return out["frames"], out["landmarks"], out["flame"]
