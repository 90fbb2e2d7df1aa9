"""Editing a face without a driving video: one edit object for every pose representation.

A :class:`FaceEdit` says what to change: head rotation (yaw, pitch, roll: set or offset, degrees),
jaw opening, expression coefficients (set or offset by index), translation in the image plane and
scale. The same object edits

- 3DMM codes (:func:`edit_codes`: FLAME ``FaceCodes`` with an axis-angle global pose and a
  weak-perspective camera, for the 3DMM-driven models), and
- keypoint poses (:func:`edit_keypoint_pose`: a rotation matrix, translation, scale and
  per-keypoint expression deltas, as in MMFA / face-vid2vid),

because everything representation-specific goes through the helpers below: angles <-> rotation
matrices, axis-angle <-> matrices, and the image-plane translation.

Angle convention (the camera frame of ``modules/renderer.py``: +X image right, +Y up, +Z towards
the camera), right-handed rotations about the camera axes, in degrees:

=========  ======  ====================================================================
angle      axis    positive turns the face ...
=========  ======  ====================================================================
``yaw``    +Y      the nose towards image right (+X; the subject's own left)
``pitch``  +X      the nose down (chin towards the chest)
``roll``   +Z      counter-clockwise in the image, as the viewer sees it
=========  ======  ====================================================================

and ``R = R_z(roll) @ R_y(yaw) @ R_x(pitch)``, the split FLAME's contour selection uses
(``flame.flame.yaw_from_rotation`` reads the same yaw). Setting or offsetting an angle decomposes
the rotation into these three angles, changes them and recomposes; near yaw = +-90 degrees
(gimbal lock) pitch and roll are not separable and the split puts the whole remainder in roll.

Jaw opening is the jaw joint's rotation about +X in degrees (FLAME: positive opens the mouth).
Translation is the image position of the head's origin in the project's normalized image
coordinates (``modules/coords.py``: [-1, 1], x right, y down); scale is the representation's own
scale (FLAME: the camera's ``s``), and ``scale_factor`` multiplies it about the head's image
position (the head stays where it is and grows).

Sequences: :func:`sweep_edits` makes a list of edits with one value swept linearly (e.g. yaw from
-30 to 30 degrees), :func:`edit_sequence` applies a list of edits to codes, and
:func:`yaw_sweep` / :func:`pitch_sweep` / :func:`roll_sweep` / :func:`jaw_sweep` /
:func:`frontalize` are the common cases. :func:`parse_edit` reads the command-line form
``"yaw=0,pitch+=5,exp[3]=1.5,scale*=1.1"``.
"""
import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

import numpy as np
import torch
from pytorch3d.transforms import axis_angle_to_matrix, matrix_to_axis_angle

ANGLES = ("yaw", "pitch", "roll")
CAMERA_AXES = (1.0, 1.0, 1.0)        # axis signs of the camera frame itself
IMAGE_AXES = (1.0, -1.0, -1.0)       # a frame with y down (image rows) and z into the screen


# ----------------------------------------------------------------------------- angle helpers
def _axis_rotation(axis, radians):
    """Right-handed rotations ``... x 3 x 3`` about camera axis 0 (X), 1 (Y) or 2 (Z)."""
    c, s = torch.cos(radians), torch.sin(radians)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    rows = {0: ((one, zero, zero), (zero, c, -s), (zero, s, c)),
            1: ((c, zero, s), (zero, one, zero), (-s, zero, c)),
            2: ((c, -s, zero), (s, c, zero), (zero, zero, one))}[axis]
    return torch.stack([torch.stack(row, -1) for row in rows], -2)


def rotation_from_angles(yaw, pitch, roll):
    """``R = R_z(roll) R_y(yaw) R_x(pitch)`` from angles in degrees (tensors of one shape, or
    numbers) -> ``... x 3 x 3``."""
    tensors = [a for a in (yaw, pitch, roll) if torch.is_tensor(a)]
    dtype = tensors[0].dtype if tensors else torch.get_default_dtype()
    device = tensors[0].device if tensors else None
    angles = torch.broadcast_tensors(*(torch.as_tensor(a, dtype=dtype, device=device)
                                       for a in (yaw, pitch, roll)))
    rad = [torch.deg2rad(a) for a in angles]
    return _axis_rotation(2, rad[2]) @ _axis_rotation(1, rad[0]) @ _axis_rotation(0, rad[1])


def angles_from_rotation(rotation):
    """(yaw, pitch, roll) in degrees of rotations ``... x 3 x 3`` (inverse of
    :func:`rotation_from_angles` for |yaw| < 90 degrees)."""
    r = rotation
    yaw = torch.atan2(-r[..., 2, 0], torch.sqrt(r[..., 2, 1] ** 2 + r[..., 2, 2] ** 2))
    pitch = torch.atan2(r[..., 2, 1], r[..., 2, 2])
    roll = torch.atan2(r[..., 1, 0], r[..., 0, 0])
    return tuple(torch.rad2deg(a) for a in (yaw, pitch, roll))


def change_frame(rotation, axes):
    """A rotation expressed in the camera frame <-> the same rotation in a frame whose axes are the
    camera axes times the signs ``axes`` (e.g. :data:`IMAGE_AXES`). Its own inverse."""
    signs = rotation.new_tensor(axes)
    return rotation * signs[:, None] * signs[None, :]            # D R D with D = diag(axes)


# ----------------------------------------------------------------------------- the edit
def _check_number(name, value, positive=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"FaceEdit.{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"FaceEdit.{name} must be positive, got {value!r}")


@dataclass(frozen=True)
class FaceEdit:
    """What to change; every field left at its default changes nothing.

    Angles and jaw opening in degrees (see the module docstring for the axes); ``expression`` and
    ``expression_offset`` map coefficient indices to values (set / add); ``translation`` is the
    head's image position (x, y) in normalized coordinates (x right, y down), and
    ``translation_offset`` moves it; ``scale`` sets the representation's scale and
    ``scale_factor`` multiplies it. Offsets apply after sets: ``yaw=10, yaw_offset=5`` gives 15.
    """
    yaw: Optional[float] = None
    pitch: Optional[float] = None
    roll: Optional[float] = None
    yaw_offset: float = 0.0
    pitch_offset: float = 0.0
    roll_offset: float = 0.0
    jaw_open: Optional[float] = None
    jaw_open_offset: float = 0.0
    expression: Mapping[int, float] = field(default_factory=dict)
    expression_offset: Mapping[int, float] = field(default_factory=dict)
    translation: Optional[Tuple[float, float]] = None
    translation_offset: Tuple[float, float] = (0.0, 0.0)
    scale: Optional[float] = None
    scale_factor: float = 1.0

    def __post_init__(self):
        for name in ANGLES + ("jaw_open",):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name))
            _check_number(f"{name}_offset", getattr(self, f"{name}_offset"))
        for name in ("expression", "expression_offset"):
            table = getattr(self, name)
            if not isinstance(table, Mapping):
                raise ValueError(f"FaceEdit.{name} maps coefficient indices to values "
                                 f"(e.g. {{0: 1.5}}), got {table!r}")
            for index, value in table.items():
                if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                    raise ValueError(f"FaceEdit.{name}: index {index!r} is not a coefficient "
                                     "index (an int >= 0)")
                _check_number(f"{name}[{index}]", value)
        for name in ("translation", "translation_offset"):
            pair = getattr(self, name)
            if pair is None:
                continue
            if len(pair) != 2:
                raise ValueError(f"FaceEdit.{name} is an image-plane (x, y) pair, got {pair!r}")
            for value in pair:
                _check_number(name, value)
        if self.scale is not None:
            _check_number("scale", self.scale, positive=True)
        _check_number("scale_factor", self.scale_factor, positive=True)

    # ------------------------------------------------------------------ what it touches
    @property
    def changes_rotation(self):
        return any(getattr(self, a) is not None or getattr(self, f"{a}_offset") for a in ANGLES)

    @property
    def changes_placement(self):
        return (self.translation is not None or any(self.translation_offset)
                or self.scale is not None or self.scale_factor != 1.0)

    # ------------------------------------------------------------------ generic pieces
    def edit_angles(self, yaw, pitch, roll):
        """Edited (yaw, pitch, roll) tensors, degrees."""
        out = []
        for name, value in zip(ANGLES, (yaw, pitch, roll)):
            target = getattr(self, name)
            value = torch.full_like(value, target) if target is not None else value
            out.append(value + getattr(self, f"{name}_offset"))
        return tuple(out)

    def apply_rotation(self, rotation, axes=CAMERA_AXES):
        """Edited rotation matrices ``B x 3 x 3``; ``axes``: the signs of the rotation's frame
        relative to the camera frame (see :func:`change_frame`). Unchanged when no angle is edited."""
        if not self.changes_rotation:
            return rotation
        camera = change_frame(rotation, axes)
        edited = rotation_from_angles(*self.edit_angles(*angles_from_rotation(camera)))
        return change_frame(edited.to(rotation.dtype), axes)

    def apply_jaw(self, opening):
        """Edited jaw opening (radians, any shape)."""
        if self.jaw_open is not None:
            opening = torch.full_like(opening, math.radians(self.jaw_open))
        return opening + math.radians(self.jaw_open_offset)

    def apply_expression(self, coefficients):
        """Edited ``B x N`` coefficients (a copy); an index beyond N is an error."""
        if not self.expression and not self.expression_offset:
            return coefficients
        size = coefficients.shape[1]
        wanted = set(self.expression) | set(self.expression_offset)
        if max(wanted) >= size:
            raise ValueError(f"FaceEdit edits expression coefficient {max(wanted)} but the "
                             f"representation has {size} (indices 0..{size - 1})")
        out = coefficients.clone()
        for index, value in self.expression.items():
            out[:, index] = value
        for index, value in self.expression_offset.items():
            out[:, index] = out[:, index] + value
        return out

    def apply_placement(self, position, scale):
        """Edited image position ``B x 2`` (normalized, y down) and scale ``B x 1``."""
        if self.translation is not None:
            position = position.new_tensor(self.translation).expand_as(position)
        position = position + position.new_tensor(self.translation_offset)
        if self.scale is not None:
            scale = torch.full_like(scale, self.scale)
        return position, scale * self.scale_factor


# ----------------------------------------------------------------------------- 3DMM codes
def _jaw_slice(pose):
    """Columns of the jaw's axis-angle in a 6-d (global, jaw) or 15-d (global, neck, jaw, eyes) pose."""
    if pose.shape[1] == 6:
        return slice(3, 6)
    if pose.shape[1] == 15:
        return slice(6, 9)
    raise ValueError(f"pose must have 6 (global, jaw) or 15 entries, got {pose.shape[1]}")


def edit_codes(codes, edit):
    """``FaceCodes`` with ``edit`` applied to every sample (a new object; the input is untouched).

    Global rotation: FLAME's axis-angle ``pose[:, :3]`` through rotation matrices. Jaw: the jaw
    joint's rotation about X (the other two jaw components are kept). Expression: ``exp``.
    Placement: the weak-perspective camera ``(s, tx, ty)`` puts the model origin at the image
    point ``(s tx, -s ty)`` (``modules/renderer.py``); that point and ``s`` are edited.
    """
    pose = codes.pose.clone()
    if edit.changes_rotation:
        rotation = axis_angle_to_matrix(pose[:, :3])
        pose[:, :3] = matrix_to_axis_angle(edit.apply_rotation(rotation))
    if edit.jaw_open is not None or edit.jaw_open_offset:
        jaw = _jaw_slice(pose)
        pose[:, jaw.start] = edit.apply_jaw(pose[:, jaw.start])
    cam = codes.cam
    if edit.changes_placement:
        scale, trans = cam[:, :1], cam[:, 1:3]
        position = torch.stack([trans[:, 0], -trans[:, 1]], 1) * scale     # image point of origin
        position, scale = edit.apply_placement(position, scale)
        cam = torch.cat([scale, position[:, :1] / scale, -position[:, 1:] / scale], 1)
    return codes.replace(pose=pose, exp=edit.apply_expression(codes.exp), cam=cam)


# ----------------------------------------------------------------------------- keypoint poses
def edit_keypoint_pose(pose, edit, axes=IMAGE_AXES):
    """A keypoint pose edited: ``pose`` holds ``rotation`` (B x 3 x 3), ``translation``
    (B x 2 or B x 3; x, y in the keypoint frame), ``scale`` (B or B x 1) and optionally
    ``expression`` (B x K x 3 per-keypoint deltas, edited as the flattened B x 3K vector).

    ``axes``: the keypoint frame's axis signs relative to the camera frame; the default is a frame
    with y down and z into the screen (grid_sample's x, y plus depth), where the image-plane
    translation is the keypoints' own x, y. Returns a new dict (other keys copied).
    """
    out = dict(pose)
    out["rotation"] = edit.apply_rotation(pose["rotation"], axes)
    if edit.changes_placement:
        signs = pose["translation"].new_tensor(axes[:2]) * pose["translation"].new_tensor([1, -1])
        translation = pose["translation"]
        scale = pose["scale"]
        flat_scale = scale.reshape(-1, 1)
        position, new_scale = edit.apply_placement(translation[:, :2] * signs, flat_scale)
        out["translation"] = torch.cat([position * signs, translation[:, 2:]], 1)
        out["scale"] = new_scale.reshape(scale.shape)
    if "expression" in pose and (edit.expression or edit.expression_offset):
        deltas = pose["expression"]
        flat = edit.apply_expression(deltas.reshape(deltas.shape[0], -1))
        out["expression"] = flat.reshape(deltas.shape)
    return out


# ----------------------------------------------------------------------------- sequences
EDITABLE_VALUES = tuple(f.name for f in dataclasses.fields(FaceEdit)
                        if f.name not in ("expression", "expression_offset", "translation",
                                          "translation_offset"))


def sweep_edits(name, start, stop, steps, base=None):
    """``steps`` edits with field ``name`` (e.g. ``'yaw'``, ``'jaw_open'``, ``'scale_factor'``)
    going linearly from ``start`` to ``stop`` (both included), on top of ``base``."""
    if name not in EDITABLE_VALUES:
        raise ValueError(f"cannot sweep {name!r}; sweepable fields: {', '.join(EDITABLE_VALUES)}")
    if steps < 1:
        raise ValueError(f"a sweep needs at least one step, got {steps}")
    base = base or FaceEdit()
    return [dataclasses.replace(base, **{name: float(v)})
            for v in np.linspace(start, stop, steps)]


def edit_sequence(codes, edits):
    """One edited copy of ``codes`` per edit (a list: the frames of an edited video)."""
    return [edit_codes(codes, edit) for edit in edits]


def yaw_sweep(codes, start=-30.0, stop=30.0, steps=31, base=None):
    """Codes turning the head from yaw ``start`` to ``stop`` degrees (set, not offset)."""
    return edit_sequence(codes, sweep_edits("yaw", start, stop, steps, base))


def pitch_sweep(codes, start=-20.0, stop=20.0, steps=21, base=None):
    return edit_sequence(codes, sweep_edits("pitch", start, stop, steps, base))


def roll_sweep(codes, start=-20.0, stop=20.0, steps=21, base=None):
    return edit_sequence(codes, sweep_edits("roll", start, stop, steps, base))


def jaw_sweep(codes, start=0.0, stop=20.0, steps=11, base=None):
    """Codes opening the jaw from ``start`` to ``stop`` degrees."""
    return edit_sequence(codes, sweep_edits("jaw_open", start, stop, steps, base))


FRONTAL = FaceEdit(yaw=0.0, pitch=0.0, roll=0.0)


def frontalize(codes):
    """Codes with the head turned to face the camera (yaw, pitch and roll set to 0)."""
    return edit_codes(codes, FRONTAL)


# ----------------------------------------------------------------------------- text form
_ITEM = re.compile(r"^\s*(?P<name>[a-z_]+)(\[(?P<index>\d+)\])?\s*(?P<op>=|\+=|-=|\*=)\s*"
                   r"(?P<value>[-+0-9.eE]+)\s*$")
_SET_OR_OFFSET = {"yaw": "yaw", "pitch": "pitch", "roll": "roll", "jaw": "jaw_open"}
_SYNTAX = ("items like yaw=0, pitch+=5, roll-=3, jaw=10, exp[3]=1.5, exp[0]+=0.5, x=0.1, y-=0.05, "
           "scale=9, scale*=1.2, separated by commas")


def parse_edit(text):
    """A :class:`FaceEdit` from its command-line form, e.g. ``"yaw=0,pitch+=5,exp[3]=1.5"``.

    ``=`` sets, ``+=`` / ``-=`` offset, ``*=`` scales (``scale`` only). Names: yaw, pitch, roll,
    jaw (opening), exp[i], x and y (image position), scale.
    """
    values = {}
    expression, expression_offset = {}, {}
    translation, offset = [None, None], [0.0, 0.0]
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = _ITEM.match(item)
        if not match:
            raise ValueError(f"cannot read the edit {item!r}; use {_SYNTAX}")
        name, op, index = match["name"], match["op"], match["index"]
        try:
            value = float(match["value"])
        except ValueError:
            raise ValueError(f"{item!r}: {match['value']!r} is not a number") from None
        value = -value if op == "-=" else value
        if (index is not None) != (name == "exp"):
            raise ValueError(f"{item!r}: only exp takes an index (exp[3]=1.5)")
        if name in _SET_OR_OFFSET and op != "*=":
            key = _SET_OR_OFFSET[name]
            values[key if op == "=" else f"{key}_offset"] = value
        elif name == "exp" and op != "*=":
            (expression if op == "=" else expression_offset)[int(index)] = value
        elif name in ("x", "y") and op != "*=":
            axis = 0 if name == "x" else 1
            if op == "=":
                translation[axis] = value
            else:
                offset[axis] = value
        elif name == "scale":
            if op in ("+=", "-="):
                raise ValueError(f"{item!r}: scale takes = (absolute) or *= (factor)")
            values["scale" if op == "=" else "scale_factor"] = value
        else:
            raise ValueError(f"cannot read the edit {item!r}; use {_SYNTAX}")
    if translation != [None, None]:
        if None in translation:
            raise ValueError("setting the image position needs both x= and y= (or use x+= / y+=)")
        values["translation"] = tuple(translation)
    return FaceEdit(expression=expression, expression_offset=expression_offset,
                    translation_offset=tuple(offset), **values)


__all__ = ["FaceEdit", "ANGLES", "CAMERA_AXES", "IMAGE_AXES", "rotation_from_angles",
           "angles_from_rotation", "change_frame", "edit_codes", "edit_keypoint_pose",
           "sweep_edits", "edit_sequence", "yaw_sweep", "pitch_sweep", "roll_sweep", "jaw_sweep",
           "FRONTAL", "frontalize", "parse_edit"]
