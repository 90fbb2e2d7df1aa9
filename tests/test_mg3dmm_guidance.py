"""Seed 003's multiple guidance (modules/mg3dmm_guidance.py): the computed flow F_c against rigid
motions worked out independently, the computed occlusion O_c on a turned head, the rendered image
I_r against the synthetic dataset's own frames, lighting, and a BFM file."""
import math
import os

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from datasets.synthetic import ensure_synthetic_dataset
from flame import FLAME, FaceCodes
from modules.coords import make_coordinate_grid
from modules.face_kit import build_face_model
from modules.mg3dmm_guidance import MultipleGuidance
from modules.renderer import weak_perspective
from modules.shading import directional_light
from test_bfm import write_bfm

SIZE = 64


@pytest.fixture(scope="module")
def flame():
    return FLAME.open_head()


@pytest.fixture(scope="module")
def guidance(flame):
    return MultipleGuidance(flame, SIZE)


def face_codes(batch=1, yaw=0.0, seed=0, light_direction=(0.3, 0.3, 1.0)):
    g = torch.Generator().manual_seed(seed)
    codes = FaceCodes.zeros(batch, scale=7.0, n_tex=50)
    codes.shape.normal_(0, 0.5, generator=g)
    codes.tex.normal_(0, 1.0, generator=g)
    codes.pose[:, 1] = math.radians(yaw)
    direction = torch.tensor([light_direction]).repeat(batch, 1)
    return codes.replace(light=directional_light(direction, 0.5, 0.5))


@torch.no_grad()
def run(guidance, source, driving):
    return guidance(guidance.target_codes(source, driving), guidance.source_geometry(source))


def inside(out):
    return out["face_mask"][:, 0] > 0.5                                  # B x H x W


# ----------------------------------------------------------------------------- F_c, eq. 3
def test_computed_flow_of_a_camera_shift_is_that_shift_inside_the_face(guidance):
    """Same mesh, camera moved by (dtx, dty): by the camera model x = s (X + tx), y = -s (Y + ty),
    every face pixel's source position is the pixel plus (s (tx_s - tx_d), -s (ty_s - ty_d))."""
    source = face_codes()
    driving = source.replace(cam=source.cam + torch.tensor([[0.0, 0.02, -0.03]]))
    out = run(guidance, source, driving)
    grid = make_coordinate_grid(SIZE, SIZE)
    shift = torch.tensor([7.0 * -0.02, -7.0 * 0.03])
    face = inside(out)[0]
    assert face.sum() > 300
    torch.testing.assert_close(out["flow"][0][face], (grid + shift)[face], atol=1e-5, rtol=0)
    assert torch.equal(out["flow"][0][~face], grid[~face])               # identity elsewhere


def test_computed_flow_of_a_roll_and_zoom_is_the_affine_map_of_the_projected_vertices(flame,
                                                                                       guidance):
    """Roll (a rotation about the view axis), zoom and shift move the projected mesh by a 2D
    affine map; fitted to the projected vertices (no rasterization involved), it must be F_c at
    every face pixel."""
    source = face_codes(seed=1)
    pose = source.pose.clone()
    pose[:, 2] = math.radians(20.0)                                      # roll
    driving = source.replace(pose=pose, cam=torch.tensor([[8.0, -0.01, 0.02]]))
    out = run(guidance, source, driving)
    with torch.no_grad():
        target = guidance.target_codes(source, driving)
        points_d = weak_perspective(flame(target).vertices, target.cam)[0].double()
        points_s = weak_perspective(flame(source).vertices, source.cam)[0].double()
    design = torch.cat([points_d, torch.ones_like(points_d[:, :1])], 1)
    affine = torch.linalg.lstsq(design, points_s).solution                # 3 x 2
    assert (design @ affine - points_s).abs().max() < 1e-5                # the motion is affine
    grid = make_coordinate_grid(SIZE, SIZE).double()
    expected = torch.cat([grid, torch.ones_like(grid[..., :1])], -1) @ affine
    face = inside(out)[0]
    assert face.sum() > 300
    torch.testing.assert_close(out["flow"][0][face].double(), expected[face], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- O_c, eq. 4
def occluded_share(out, columns):
    occluded = (out["occlusion"][0, 0] < 0.5) & inside(out)[0]
    face = inside(out)[0]
    return float(occluded[:, columns].sum()) / float(face[:, columns].sum())


def test_occlusion_marks_the_cheek_a_30_degree_yaw_turns_away(guidance):
    """Source turned 30 degrees (positive yaw: the nose towards image right, so the image-right
    cheek turns away from the camera), target frontal: the target's image-right cheek is not seen
    in the source; the other cheek is."""
    left, right = slice(0, SIZE // 2), slice(SIZE // 2, SIZE)
    out = run(guidance, face_codes(yaw=30.0), face_codes(yaw=0.0))
    assert occluded_share(out, right) > 0.15
    assert occluded_share(out, left) < 0.01
    mirrored = run(guidance, face_codes(yaw=-30.0), face_codes(yaw=0.0))
    assert occluded_share(mirrored, left) > 0.15
    assert occluded_share(mirrored, right) < 0.01
    assert ((out["occlusion"] < 0.5) <= (out["face_mask"] > 0.5)).all()   # only inside the face


def test_occlusion_marks_nothing_on_a_frontal_to_frontal_pair(guidance):
    everything = slice(0, SIZE)
    source = face_codes(seed=2)
    assert occluded_share(run(guidance, source, source), everything) == 0.0
    talking = source.replace(exp=torch.randn(1, 50, generator=torch.Generator().manual_seed(3)))
    assert occluded_share(run(guidance, source, talking), everything) < 0.01


# ----------------------------------------------------------------------------- I_r
@pytest.fixture(scope="module")
def synthetic_frame(tmp_path_factory):
    root = ensure_synthetic_dataset(str(tmp_path_factory.mktemp("mg3dmm") / "synthetic"), size=SIZE,
                                    train_videos=2, test_videos=1, frames=2, seed=3)
    video = os.path.join(root, "train", sorted(os.listdir(os.path.join(root, "train")))[0])
    frame = imageio.imread(os.path.join(video, sorted(os.listdir(video))[0]))
    arrays = np.load(video + ".flame.npz")
    codes = FaceCodes.from_numpy({k: arrays[k][:1] for k in arrays.files})
    image = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255
    return image, codes


def test_rendered_image_of_the_source_codes_reproduces_the_source_face(guidance,
                                                                        synthetic_frame):
    """The synthetic frames are the open head in albedo(tex) x SH(light): I_r of a frame's own
    sidecar codes (source = driving) gives its face region back up to the PNG's 8-bit rounding."""
    image, codes = synthetic_frame
    assert codes.tex is not None and codes.light is not None
    out = run(guidance, codes, codes)
    face = out["face_mask"].expand_as(image) > 0.5
    assert face[:, 0].sum() > 200
    error = (out["rendered"] - image).abs()[face]
    assert error.max() < 0.6 / 255 and error.mean() < 0.35 / 255        # measured 0.50, 0.25
    assert float(out["rendered"][face].std()) > 0.05                     # a face, not a flat fill


def test_changing_only_the_light_changes_the_shading_not_the_motion(guidance):
    source = face_codes(seed=4)
    driving = face_codes(seed=4, yaw=15.0)
    relit = source.replace(light=directional_light(torch.tensor([[-0.8, -0.2, 0.5]]), 0.7, 0.2))
    out, out_relit = run(guidance, source, driving), run(guidance, relit, driving)
    for key in ("flow", "occlusion", "face_mask", "mask"):
        assert torch.equal(out[key], out_relit[key]), key
    mesh = out["mask"][0, 0] > 0.5
    assert (out["shading"] - out_relit["shading"]).abs()[0][:, mesh].mean() > 0.1
    assert (out["rendered"] - out_relit["rendered"]).abs()[0][:, mesh].mean() > 0.02


# ----------------------------------------------------------------------------- BFM
def test_a_bfm_file_in_the_documented_layout_loads_through_the_face_kit_and_renders(tmp_path):
    """build_face_model picks BFM for ``bfm_path``; the guidance renders it: I_r on the mesh,
    the identity flow and no occlusion for a pair of equal codes, and a shifted camera's motion."""
    write_bfm(tmp_path / "BFM_model_front.mat")
    bfm = build_face_model({"model_dir": None, "bfm_path": str(tmp_path / "BFM_model_front.mat"),
                            "n_shape": 80, "n_exp": 64, "n_tex": 80})
    assert (bfm.n_shape, bfm.n_exp, bfm.n_tex) == (80, 64, 80)
    guidance = MultipleGuidance(bfm, 32)
    codes = FaceCodes.zeros(1, n_shape=80, n_exp=64, n_pose=6, scale=9.0, n_tex=80)
    codes = codes.replace(light=directional_light(torch.tensor([[0.0, 0.3, 1.0]]), 0.5, 0.5))
    out = run(guidance, codes, codes)
    face = inside(out)[0]
    assert face.sum() > 100 and torch.equal(out["face_mask"], out["mask"])   # BFM: whole mesh
    assert float(out["rendered"][0][:, face].mean()) > 0.2
    grid = make_coordinate_grid(32, 32)
    torch.testing.assert_close(out["flow"][0], grid, atol=1e-6, rtol=0)
    assert (out["occlusion"] == 1).all()
    shifted = run(guidance, codes, codes.replace(cam=torch.tensor([[9.0, 0.01, 0.0]])))
    face = inside(shifted)[0]
    torch.testing.assert_close(shifted["flow"][0][face], (grid + torch.tensor([-0.09, 0.0]))[face],
                               atol=1e-5, rtol=0)


def test_the_progressive_warping_guidance_renders_a_bfm_face_model(tmp_path):
    """Seed 001 Table 1's BFM row: the progressive-warping guidance takes the face model the
    face kit builds for ``bfm_path`` unchanged (NMFC and displacement on the BFM mesh)."""
    from modules.guidance import GuidanceRenderer
    write_bfm(tmp_path / "BFM_model_front.mat")
    bfm = build_face_model({"model_dir": None, "bfm_path": str(tmp_path / "BFM_model_front.mat"),
                            "n_shape": 80, "n_exp": 64})
    codes = FaceCodes.zeros(1, n_shape=80, n_exp=64, scale=9.0)
    moved = codes.replace(cam=torch.tensor([[9.0, 0.01, 0.0]]))
    for kind in ("nmfc", "geom_disp"):
        maps = GuidanceRenderer(bfm, 32, kind)(codes, moved)
        visible = maps.driving_mask[0, 0] > 0.5
        assert visible.sum() > 100
        assert maps.decoder_guidance[0][:, visible].abs().sum() > 0


def test_a_bfm_path_with_too_many_components_names_the_keys(tmp_path):
    write_bfm(tmp_path / "BFM_model_front.mat")
    with pytest.raises(ValueError, match="n_shape"):
        build_face_model({"model_dir": None, "bfm_path": str(tmp_path / "BFM_model_front.mat"),
                          "n_shape": 100, "n_exp": 50})
    with pytest.raises(FileNotFoundError, match="BFM_model_front.mat"):
        build_face_model({"model_dir": None, "bfm_path": str(tmp_path / "missing.mat"),
                          "n_shape": 80, "n_exp": 64})
