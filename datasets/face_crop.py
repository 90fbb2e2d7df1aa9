"""Square face crops, as the training data was cut, and pasting an animated crop back.

Every model here is trained on face crops: a face box enlarged ``CROP_SCALE`` times about its
centre, made square and resized to the model's frame size (``tools/crop_video.py`` cuts datasets
that way). This module holds that rule and what real photos and videos need around it:

* :func:`square_around` / :func:`place_square` / :func:`square_crop`: the crop of a face box.
  ``fit=True`` (dataset cutting) shrinks a crop larger than the frame to fit inside it;
  ``fit=False`` (animating a photo) keeps the face's scale and pads where the crop leaves the
  frame, so a non-square picture is never squashed.
* :func:`crop_frame`: cut a crop out of a frame (edge padding outside) and resize it.
* :func:`detect_scaled` / :func:`select_face`: run a ``faces`` backend on a frame of any size,
  choose the largest face or the N-th from the left.
* :func:`crop_track`: one crop per video frame, following the face, smoothed over time with the
  One-Euro filter; frames without a face keep the last good crop.
* :func:`feather_mask` / :func:`paste_back`: blend an animated crop into the original picture.

Crops are ``(left, top, side)`` in pixels of the original frame (integers); face boxes are
``(x1, y1, x2, y2[, score])`` as the ``faces`` backends return them.
"""
import numpy as np
from PIL import Image

from modules.one_euro import smooth_sequence

CROP_SCALE = 1.8          # face box side -> crop side (tools/crop_video.py --scale)
DETECT_WIDTH = 640        # larger frames are shrunk to this width for detection
DETECT_MIN_WIDTH = 256    # smaller frames are enlarged to this width (HOG misses small faces)
MIN_FACE = 32             # detections narrower than this (original pixels) are ignored


# --------------------------------------------------------------------------- geometry
def iou(a, b):
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def square_around(box, scale=CROP_SCALE):
    """``(centre_x, centre_y, side)`` of the square crop of a face box: its longer side times
    ``scale``, centred on the box."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    return (x1 + x2) / 2.0, (y1 + y2) / 2.0, max(x2 - x1, y2 - y1) * scale


def _place_axis(centre, side, length):
    """Start of a ``side``-long window centred on ``centre``, moved to lie inside ``[0, length]``
    when it fits, else (longer than ``length``) moved only as far as needed to cover it."""
    start = centre - side / 2.0
    low, high = sorted((0.0, length - side))
    return float(np.clip(start, low, high))


def place_square(centre_x, centre_y, side, height, width, fit=True):
    """Integer ``(left, top, side)`` of a square centred at ``(centre_x, centre_y)`` in a
    ``height x width`` frame. ``fit``: shrink it to the frame's shorter side first (the crop then
    lies inside the frame); otherwise it keeps its size and may leave the frame (to be padded)."""
    side = max(1.0, min(side, width, height) if fit else side)
    left = _place_axis(centre_x, side, width)
    top = _place_axis(centre_y, side, height)
    return int(round(left)), int(round(top)), int(round(side))


def square_crop(box, height, width, scale=CROP_SCALE, fit=True):
    """``(left, top, side)`` of the square crop around face ``box`` enlarged ``scale`` times."""
    return place_square(*square_around(box, scale), height, width, fit)


def crop_frame(frame, crop, size):
    """The ``crop = (left, top, side)`` of an H x W x 3 uint8 frame resized to ``size`` (an int or
    ``(H, W)``); parts outside the frame repeat its edge pixels (no black bars, which the training
    crops never have)."""
    left, top, side = (int(v) for v in crop)
    height, width = frame.shape[:2]
    pad = [max(0, -top), max(0, top + side - height), max(0, -left), max(0, left + side - width)]
    patch = frame[max(0, top):top + side, max(0, left):left + side]
    if any(pad):
        patch = np.pad(patch, ((pad[0], pad[1]), (pad[2], pad[3]), (0, 0)), mode="edge")
    out_h, out_w = (size, size) if np.isscalar(size) else size
    if patch.shape[:2] == (out_h, out_w):
        return np.ascontiguousarray(patch)
    return np.asarray(Image.fromarray(patch).resize((out_w, out_h), Image.BICUBIC))


def crop_points(points, crop, size):
    """Pixel-index points ``... x 2`` (x, y) of the original frame -> pixel indices of the crop
    resized to ``size x size`` (pixel centres map onto pixel centres)."""
    left, top, side = crop
    factor = size / float(side)
    return (np.asarray(points, np.float64) - [left, top] + 0.5) * factor - 0.5


# --------------------------------------------------------------------------- detection
def detect_scaled(detect, frame, detect_width=DETECT_WIDTH, min_face=MIN_FACE, min_width=0):
    """Run a ``faces`` backend on ``frame`` resized to at most ``detect_width`` wide (and at
    least ``min_width``: small frames are enlarged); ``N x 5`` boxes in the frame's own pixels,
    those narrower than ``min_face`` dropped."""
    width = frame.shape[1]
    factor = min(1.0, detect_width / width) if detect_width else 1.0
    if min_width and width * factor < min_width:
        factor = min_width / width
    scaled = frame
    if factor != 1.0:
        size = (max(1, round(width * factor)), max(1, round(frame.shape[0] * factor)))
        scaled = np.asarray(Image.fromarray(frame).resize(size, Image.BILINEAR))
    boxes = np.asarray(detect(scaled), np.float64).reshape(-1, 5).copy()
    boxes[:, :4] /= factor
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    return boxes[sides >= min_face]


def describe_boxes(boxes):
    """'0: (x1, y1)-(x2, y2), 1: ...' for messages, faces numbered from the left."""
    return ", ".join(f"{i}: ({b[0]:.0f}, {b[1]:.0f})-({b[2]:.0f}, {b[3]:.0f})"
                     for i, b in enumerate(faces_left_to_right(boxes)))


def faces_left_to_right(boxes):
    boxes = np.asarray(boxes, np.float64).reshape(-1, 5)
    return boxes[np.argsort(boxes[:, 0] + boxes[:, 2], kind="stable")]


def select_face(boxes, face_index=None):
    """The face box to crop: the largest one, or with ``face_index`` the N-th from the left.
    ``None`` when there is none; a ``face_index`` beyond the faces found is an error."""
    boxes = faces_left_to_right(boxes)
    if face_index is None:
        if not len(boxes):
            return None
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return boxes[int(np.argmax(areas))]
    if not 0 <= face_index < len(boxes):
        found = f"faces found, numbered from the left: {describe_boxes(boxes)}" if len(boxes) \
            else "no face was found"
        raise ValueError(f"face_index {face_index} does not exist ({found}); pick one of them "
                         "or leave face_index unset for the largest face")
    return boxes[face_index]


# --------------------------------------------------------------------------- tracking
def follow_face(detections):
    """One face box per frame (``None`` where none is found) from per-frame ``N x 5`` boxes: the
    largest face where the track starts, then in each frame the box nearest to the last one kept,
    if it is closer than that box's size (another face further away is not a jump to take)."""
    chosen, last = [], None
    for boxes in detections:
        boxes = np.asarray(boxes, np.float64).reshape(-1, 5)
        box = None
        if len(boxes) and last is None:
            box = select_face(boxes)
        elif len(boxes):
            centre, size = (last[:2] + last[2:4]) / 2, max(last[2] - last[0], last[3] - last[1])
            distances = np.linalg.norm((boxes[:, :2] + boxes[:, 2:4]) / 2 - centre, axis=1)
            nearest = int(np.argmin(distances))
            box = boxes[nearest] if distances[nearest] < size else None
        chosen.append(box)
        last = box if box is not None else last
    return chosen


def limit_steps(values, max_step):
    """A ``T x D`` sequence whose rows move at most ``max_step`` per step (per element) towards
    the given ones: bounded change, and a smooth catch-up after a jump."""
    out = np.array(values, np.float64)
    for t in range(1, len(out)):
        out[t] = out[t - 1] + np.clip(out[t] - out[t - 1], -max_step, max_step)
    return out


def crop_track(detections, height, width, fps=25.0, scale=CROP_SCALE, min_cutoff=0.3, beta=2.0,
               max_step=0.05):
    """Integer ``T x 3`` crops ``(left, top, side)`` for a video from its per-frame detections.

    The crop square (centre and side, in units of the median face crop so the settings do not
    depend on the resolution) is smoothed with the One-Euro filter at the video's ``fps``:
    ``min_cutoff`` (Hz) removes detector jitter while the head rests, ``beta`` lets the crop
    follow a head that moves. Frames without a face keep the last good crop (the first good one
    before it). Then no frame moves the crop by more than ``max_step`` crop sides (a face found
    again elsewhere after frames without one is reached over a few frames, not in a jump).
    Returns ``(crops, found)``: ``found`` marks the frames where a face was detected; when none
    was, ``crops`` is ``None``.
    """
    boxes = follow_face(detections)
    found = np.array([box is not None for box in boxes], bool)
    if not found.any():
        return None, found
    squares = np.array([square_around(box, scale) if box is not None else (np.nan,) * 3
                        for box in boxes])
    unit = float(np.median(squares[found, 2]))
    smooth = smooth_sequence(np.nan_to_num(squares / unit), fps, min_cutoff, beta, valid=found)
    smooth = limit_steps(smooth, max_step) * unit
    crops = np.array([place_square(x, y, s, height, width, fit=False) for x, y, s in smooth])
    return crops, found


# --------------------------------------------------------------------------- paste back
def feather_mask(side, inner=0.65, outer=0.97):
    """``side x side`` float32 blend weights for pasting a crop back: 1 over the face (within
    ``inner`` of the crop's half-width from its centre, per axis), falling smoothly to 0 at
    ``outer``, and 0 on the crop's border, so the animated crop meets the photo without a seam.
    (The face box spans about 1 / CROP_SCALE = 0.56 of the crop.)"""
    u = np.abs((np.arange(side, dtype=np.float64) + 0.5) / side * 2 - 1)
    t = np.clip((outer - u) / (outer - inner), 0.0, 1.0)
    ramp = t * t * (3 - 2 * t)                                  # smoothstep
    return np.outer(ramp, ramp).astype(np.float32)


def paste_back(original, crop_image, crop, mask=None):
    """``original`` (H x W x 3 uint8) with the animated ``crop_image`` (S x S x 3 uint8, any S)
    resized to the crop's ``side`` and blended in at ``crop = (left, top, side)`` with ``mask``
    (side x side weights, :func:`feather_mask` by default). Pixels outside the crop, and where
    the mask is 0, are the original's exactly."""
    left, top, side = (int(v) for v in crop)
    if mask is None:
        mask = feather_mask(side)
    if mask.shape != (side, side):
        raise ValueError(f"paste-back mask has shape {mask.shape}, expected ({side}, {side})")
    height, width = original.shape[:2]
    y0, y1, x0, x1 = max(0, top), min(height, top + side), max(0, left), min(width, left + side)
    out = original.copy()
    if y0 >= y1 or x0 >= x1:
        return out
    resized = crop_image if crop_image.shape[:2] == (side, side) else \
        np.asarray(Image.fromarray(crop_image).resize((side, side), Image.BICUBIC))
    inside = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
    weight = mask[inside][..., None]
    region = out[y0:y1, x0:x1].astype(np.float32)
    blended = region + weight * (resized[inside].astype(np.float32) - region)
    out[y0:y1, x0:x1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out
