"""The editing interface (modules/editing.py): angle conventions, codes, keypoint poses, sweeps."""
import math

import numpy as np
import pytest
import torch
from pytorch3d.transforms import matrix_to_axis_angle

from flame import FaceCodes
from flame.flame import rodrigues, yaw_from_rotation
from modules.editing import (CAMERA_AXES, IMAGE_AXES, FaceEdit, angles_from_rotation, edit_codes,
                             edit_keypoint_pose, frontalize, jaw_sweep, parse_edit,
                             rotation_from_angles, sweep_edits, yaw_sweep)
from modules.renderer import weak_perspective

FORWARD = torch.tensor([0.0, 0.0, 1.0])          # the nose direction of a frontal face (+Z)


def codes_with_angles(yaw, pitch, roll, batch=2):
    codes = FaceCodes.zeros(batch, n_shape=4, n_exp=6, scale=8.0)
    rotation = rotation_from_angles(torch.full((batch,), yaw), torch.full((batch,), pitch),
                                    torch.full((batch,), roll))
    pose = codes.pose.clone()
    pose[:, :3] = matrix_to_axis_angle(rotation)
    return codes.replace(pose=pose)


def code_angles(codes):
    """(yaw, pitch, roll) of the codes' global pose through FLAME's own axis-angle decoder."""
    return angles_from_rotation(rodrigues(codes.pose[:, :3]))


# ----------------------------------------------------------------------------- conventions
def test_angles_turn_the_nose_the_documented_way():
    # yaw +90: nose to +X (image right); pitch +90: nose down (-Y); roll +90: +X (right) to +Y (up)
    torch.testing.assert_close(rotation_from_angles(90.0, 0.0, 0.0) @ FORWARD,
                               torch.tensor([1.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(rotation_from_angles(0.0, 90.0, 0.0) @ FORWARD,
                               torch.tensor([0.0, -1.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(rotation_from_angles(0.0, 0.0, 90.0) @ torch.tensor([1.0, 0, 0]),
                               torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)


def test_angles_round_trip_and_match_flame_yaw():
    generator = torch.Generator().manual_seed(0)
    yaw, pitch, roll = (torch.rand(50, generator=generator, dtype=torch.float64) * 160 - 80
                        for _ in range(3))
    rotation = rotation_from_angles(yaw, pitch, roll)
    eye = torch.eye(3, dtype=torch.float64).expand(50, 3, 3)
    torch.testing.assert_close(rotation @ rotation.transpose(1, 2), eye)
    assert torch.allclose(torch.det(rotation), torch.ones(50, dtype=torch.float64))
    for got, want in zip(angles_from_rotation(rotation), (yaw, pitch, roll)):
        torch.testing.assert_close(got, want)
    # FLAME picks its jaw contour by this yaw: the same angle
    torch.testing.assert_close(torch.rad2deg(yaw_from_rotation(rotation)), yaw)


# ----------------------------------------------------------------------------- FaceCodes
def test_set_and_offset_angles_on_codes():
    codes = codes_with_angles(12.0, -8.0, 5.0)
    edited = edit_codes(codes, FaceEdit(yaw=-25.0, pitch_offset=10.0))
    yaw, pitch, roll = code_angles(edited)
    torch.testing.assert_close(yaw, torch.full((2,), -25.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(pitch, torch.full((2,), 2.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(roll, torch.full((2,), 5.0), atol=1e-3, rtol=0)
    assert torch.equal(codes.pose, codes_with_angles(12.0, -8.0, 5.0).pose)   # input untouched
    frontal = code_angles(frontalize(codes))
    for angle in frontal:
        assert angle.abs().max() < 1e-3


def test_jaw_expression_and_no_op_edits():
    codes = FaceCodes.zeros(2, n_shape=4, n_exp=6)
    codes.exp[:, 1] = 0.5
    edited = edit_codes(codes, FaceEdit(jaw_open=10.0, expression={0: 1.5}, expression_offset={1: 0.25}))
    torch.testing.assert_close(edited.pose[:, 3], torch.full((2,), math.radians(10.0)))
    assert torch.equal(edited.pose[:, 4:6], codes.pose[:, 4:6])
    torch.testing.assert_close(edited.exp[:, :3], torch.tensor([[1.5, 0.75, 0.0]] * 2))
    # a 15-d pose (global, neck, jaw, eyes): the jaw is columns 6..8
    full = FaceCodes.zeros(1, n_shape=4, n_exp=6).replace(pose=torch.zeros(1, 15))
    assert edit_codes(full, FaceEdit(jaw_open_offset=5.0)).pose[0, 6] == pytest.approx(math.radians(5))
    unchanged = edit_codes(codes, FaceEdit())
    for name, value in codes.fields():
        assert torch.equal(getattr(unchanged, name), value)
    with pytest.raises(ValueError, match="coefficient 9 .* has 6"):
        edit_codes(codes, FaceEdit(expression={9: 1.0}))


def test_translation_and_scale_move_the_projected_head():
    codes = FaceCodes.zeros(1, n_shape=4, n_exp=6, scale=8.0)
    codes.cam[:, 1:] = torch.tensor([[0.02, -0.01]])
    origin = torch.zeros(1, 1, 3)
    point = torch.tensor([[[0.05, 0.03, 0.0]]])
    before = weak_perspective(torch.cat([origin, point], 1), codes.cam)[0]
    placed = edit_codes(codes, FaceEdit(translation=(0.3, -0.2)))
    torch.testing.assert_close(weak_perspective(origin, placed.cam)[0, 0], torch.tensor([0.3, -0.2]))
    moved = edit_codes(codes, FaceEdit(translation_offset=(0.1, 0.05), scale_factor=1.5))
    after = weak_perspective(torch.cat([origin, point], 1), moved.cam)[0]
    torch.testing.assert_close(after[0], before[0] + torch.tensor([0.1, 0.05]))     # origin moved
    torch.testing.assert_close(after[1] - after[0], 1.5 * (before[1] - before[0]))  # grown about it
    assert edit_codes(codes, FaceEdit(scale=5.0)).cam[0, 0] == 5.0


# ----------------------------------------------------------------------------- keypoint poses
def test_keypoint_pose_edit_in_an_image_axes_frame():
    """A y-down, z-into-the-screen keypoint frame: +20 degrees of yaw still moves the point
    facing the camera to image right, and the image position is the translation's x, y."""
    pose = {"rotation": torch.eye(3)[None], "translation": torch.tensor([[0.1, 0.2, 0.0]]),
            "scale": torch.tensor([1.2]), "expression": torch.zeros(1, 4, 3)}
    edit = FaceEdit(yaw=20.0, translation_offset=(0.05, -0.1), scale_factor=2.0,
                    expression={5: 0.3})
    out = edit_keypoint_pose(pose, edit, IMAGE_AXES)
    towards_camera = torch.tensor([0.0, 0.0, -1.0])                   # z into the screen
    turned = out["rotation"][0] @ towards_camera
    assert turned[0] == pytest.approx(math.sin(math.radians(20)), abs=1e-6)   # image right
    torch.testing.assert_close(out["translation"], torch.tensor([[0.15, 0.1, 0.0]]))
    torch.testing.assert_close(out["scale"], torch.tensor([2.4]))
    assert out["expression"][0, 1, 2] == pytest.approx(0.3) and out["expression"].abs().sum() == 0.3
    # in the camera frame the same edit is the plain rotation
    camera = edit_keypoint_pose(pose, FaceEdit(yaw=20.0), CAMERA_AXES)["rotation"][0]
    torch.testing.assert_close(camera, rotation_from_angles(20.0, 0.0, 0.0))


# ----------------------------------------------------------------------------- sequences, text
def test_sweeps_produce_the_requested_angles():
    codes = codes_with_angles(5.0, 3.0, 0.0, batch=1)
    frames = yaw_sweep(codes, -30.0, 30.0, 7)
    assert len(frames) == 7
    yaws = torch.cat([code_angles(c)[0] for c in frames])
    torch.testing.assert_close(yaws, torch.linspace(-30, 30, 7), atol=1e-3, rtol=0)
    pitches = torch.cat([code_angles(c)[1] for c in frames])
    torch.testing.assert_close(pitches, torch.full((7,), 3.0), atol=1e-3, rtol=0)
    jaws = torch.cat([c.pose[:, 3] for c in jaw_sweep(codes, 0.0, 20.0, 3)])
    torch.testing.assert_close(jaws, torch.deg2rad(torch.tensor([0.0, 10.0, 20.0])))
    edits = sweep_edits("scale_factor", 1.0, 2.0, 3, base=FaceEdit(yaw=0.0))
    assert [e.scale_factor for e in edits] == [1.0, 1.5, 2.0] and all(e.yaw == 0 for e in edits)
    with pytest.raises(ValueError, match="cannot sweep 'expression'"):
        sweep_edits("expression", 0, 1, 2)


def test_parse_edit_reads_the_command_line_form():
    edit = parse_edit("yaw=0, pitch+=5, roll-=3, jaw=10, exp[3]=1.5, exp[0]+=0.5, x+=0.1, scale*=1.2")
    assert edit == FaceEdit(yaw=0.0, pitch_offset=5.0, roll_offset=-3.0, jaw_open=10.0,
                            expression={3: 1.5}, expression_offset={0: 0.5},
                            translation_offset=(0.1, 0.0), scale_factor=1.2)
    assert parse_edit("x=0.1,y=-0.2").translation == (0.1, -0.2)
    for bad, message in (("nose=3", "cannot read the edit"), ("yaw=abc", "cannot read"),
                         ("scale+=1", "scale takes"), ("x=0.1", "needs both"),
                         ("yaw[2]=1", "only exp takes an index")):
        with pytest.raises(ValueError, match=message):
            parse_edit(bad)


@pytest.mark.parametrize("kwargs, message", [
    ({"yaw": "20"}, "yaw must be a finite number"),
    ({"pitch_offset": float("nan")}, "pitch_offset must be a finite number"),
    ({"expression": {-1: 1.0}}, "not a coefficient index"),
    ({"expression": [1.0]}, "maps coefficient indices"),
    ({"translation": (0.1,)}, "image-plane"),
    ({"scale_factor": 0.0}, "must be positive"),
])
def test_bad_edits_are_refused_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FaceEdit(**kwargs)


def test_axis_angle_conversion_matches_flame():
    """The codes' axis-angle goes through pytorch3d; FLAME decodes with its own Rodrigues: they
    must agree, or an edit would turn the mesh by another rotation than asked."""
    codes = codes_with_angles(25.0, -15.0, 10.0, batch=1)
    np.testing.assert_allclose(rodrigues(codes.pose[:, :3]).numpy(),
                               rotation_from_angles(25.0, -15.0, 10.0)[None].numpy(), atol=1e-5)
