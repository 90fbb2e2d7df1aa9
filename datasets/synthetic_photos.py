"""Synthetic stand-ins for real inputs: a portrait "photo" (a non-square picture with the face off
centre and small in it) and a phone-style driving clip whose face drifts across the frame.

Both are rendered with the synthetic talking-head renderer (``datasets/synthetic.py``) at a
larger frame than the head, then cut to a non-square canvas, so the background is continuous and
the ground-truth landmarks come along (pixels of the returned pictures). Head rotations are
damped so dlib's frontal HOG detector finds the face in every frame. Used by the crop tests and
``tools/paste_back_figure.py``.
"""
import numpy as np

from datasets.synthetic import TalkingHeadRenderer, sample_motion

_RENDERERS = {}


def renderer(size):
    """One renderer per frame size (building one loads the head model)."""
    if size not in _RENDERERS:
        _RENDERERS[size] = TalkingHeadRenderer(size, 1)
    return _RENDERERS[size]


def render_heads(size, frames, head_scale, shift_x, shift_y, seed=0, turn=0.3):
    """``(frames T x size x size x 3 uint8, landmarks T x 74 x 2 pixels)`` of one synthetic
    identity talking, its head ``head_scale`` times the dataset's size and moved by
    ``(shift_x, shift_y)`` (T values or one each, in frame half-widths: 0.5 is a quarter of the
    frame to the right / down). Head rotations are scaled by ``turn``."""
    head = renderer(size)
    rng = np.random.default_rng([seed, 41])
    identity = head.sample_identity(rng)
    motion = sample_motion(rng, frames, head.n_exp, identity["scale"])
    motion["pose"][:, :3] *= turn
    scale = motion["cam"][:, 0] * head_scale
    # weak perspective: x_normalized = s (X + t), so a shift d of the picture is t = d / s;
    # the head model's y axis points up, the picture's down
    motion["cam"] = np.stack([scale, np.broadcast_to(shift_x, (frames,)) / scale,
                              -np.broadcast_to(shift_y, (frames,)) / scale], axis=1)
    clip, landmarks, _, _ = head.render_clip(identity, motion, head.sample_scene(rng))
    return clip, landmarks


def cut(frames, landmarks, top, left, height, width):
    """Frames and landmarks of the ``height x width`` window at ``(top, left)``."""
    return (np.ascontiguousarray(frames[:, top:top + height, left:left + width]),
            landmarks - np.array([left, top], np.float32))


def portrait_photo(size=256, width=208, seed=0, head_scale=0.45, shift=(0.3, -0.1)):
    """A ``size x width`` portrait picture (uint8) and its 74 landmarks (pixels): the face is
    about a quarter of the picture wide, right of and above its centre."""
    frames, landmarks = render_heads(size, 1, head_scale, shift[0], shift[1], seed)
    photo, points = cut(frames, landmarks, 0, (size - width) // 2, size, width)
    return photo[0], points[0]


def drifting_clip(frames=12, width=176, height=144, seed=1, head_scale=0.6, drift=(-0.25, 0.25),
                  shift_y=0.0):
    """A ``frames x height x width`` driving clip (uint8) whose face drifts from ``drift[0]`` to
    ``drift[1]`` (frame half-widths, left to right), and its landmarks ``T x 74 x 2`` (pixels)."""
    shift_x = np.linspace(drift[0], drift[1], frames)
    clip, landmarks = render_heads(width, frames, head_scale, shift_x, shift_y, seed)
    return cut(clip, landmarks, (width - height) // 2, 0, height, width)
