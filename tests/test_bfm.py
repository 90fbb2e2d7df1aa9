"""The Basel Face Model loader and decoder, on a tiny BFM file written here in the
``BFM_model_front.mat`` layout (MATLAB v5, interleaved x y z, 1-based triangles and keypoints)."""
import numpy as np
import pytest
import scipy.io
import torch
from scipy.spatial.transform import Rotation

from flame import FaceCodes
from flame.bfm import BFM, load_bfm_model
from modules.coords import normalized_to_pixels
from modules.renderer import Renderer, weak_perspective
from modules.shading import ShadedFace, neutral_light

GRID = 15                     # 15 x 15 vertices: a bump of the front of a face
N_ID, N_EXP, N_TEX = 80, 64, 80


def tiny_bfm_arrays(seed=0, clockwise=False, unit_scale=1.0):
    """Arrays of a tiny BFM in Deep3DFaceRecon's units (1 = 0.1 m; ``unit_scale`` rescales)."""
    rng = np.random.default_rng(seed)
    u, v = np.meshgrid(np.linspace(-1, 1, GRID), np.linspace(-1, 1, GRID))   # rows go up in y
    z = 0.6 * np.sqrt(np.clip(1 - 0.6 * u ** 2 - 0.4 * v ** 2, 0, None))
    mean = np.stack([0.75 * u, 0.95 * v, z], -1).reshape(-1, 3) + [0.1, -0.2, 3.0]   # off centre
    tri = []
    for i in range(GRID - 1):
        for j in range(GRID - 1):
            a, b, c, d = i * GRID + j, i * GRID + j + 1, (i + 1) * GRID + j + 1, (i + 1) * GRID + j
            tri += [[a, b, c], [a, c, d]]              # counter-clockwise seen from +z
    tri = np.array(tri)
    if clockwise:
        tri = tri[:, [0, 2, 1]]
    centre, left, right = 7 * GRID + 7, 7 * GRID + 2, 7 * GRID + 12
    interior = [i * GRID + j for i in range(2, GRID - 2) for j in range(2, GRID - 2)
                if i * GRID + j not in (centre, left, right)]
    keypoints = rng.choice(interior, 68, replace=False)
    keypoints[30], keypoints[0], keypoints[16] = centre, left, right    # nose tip, jaw ends
    n3 = mean.size
    color = np.stack([0.8 + 0.1 * u, 0.6 + 0.05 * v, 0.5 * np.ones_like(u)], -1).reshape(-1, 3)
    return {
        "meanshape": (mean * unit_scale).reshape(1, -1),                  # x y z interleaved
        "idBase": rng.normal(0, 0.01, (n3, N_ID)) * unit_scale,
        "exBase": rng.normal(0, 0.01, (n3, N_EXP)) * unit_scale,
        "meantex": (255 * color).reshape(1, -1),
        "texBase": rng.normal(0, 4.0, (n3, N_TEX)),
        "tri": (tri + 1).astype(np.float64),                              # 1-based, as MATLAB
        "keypoints": (keypoints + 1).astype(np.float64).reshape(1, -1),
        "point_buf": np.ones((GRID * GRID, 8)),                           # present, not needed
    }


def write_bfm(path, **kwargs):
    arrays = tiny_bfm_arrays(**kwargs)
    scipy.io.savemat(str(path), arrays)
    return arrays


def expected_vertices(arrays, alpha, beta, rotvec, unit=0.1):
    """Seed 003 eq. 1 by hand: (V_mean + alpha V_id + beta V_exp) R^T, centred, in metres."""
    mean = arrays["meanshape"].reshape(-1, 3)
    flat = arrays["meanshape"][0] + arrays["idBase"][:, :len(alpha)] @ alpha \
        + arrays["exBase"][:, :len(beta)] @ beta
    vertices = (flat.reshape(-1, 3) - mean.mean(0)) * unit
    return vertices @ Rotation.from_rotvec(rotvec).as_matrix().T


def codes_for(alpha, beta, rotvec, scale=9.0):
    t = lambda a: torch.tensor(np.asarray(a)[None], dtype=torch.float32)  # noqa: E731
    return FaceCodes(shape=t(alpha), exp=t(beta), pose=t(rotvec),
                     cam=torch.tensor([[scale, 0.0, 0.0]]))


# ----------------------------------------------------------------------------- layout
def test_file_in_the_documented_layout_decodes_as_eq1_with_1_based_indices(tmp_path):
    arrays = write_bfm(tmp_path / "BFM_model_front.mat")
    bfm = BFM.from_file(tmp_path / "BFM_model_front.mat")
    assert (bfm.n_shape, bfm.n_exp, bfm.n_tex) == (N_ID, N_EXP, N_TEX)
    assert bfm.length_unit == pytest.approx(0.1) and bfm.face_uvs() is None
    np.testing.assert_array_equal(bfm.faces.numpy(), arrays["tri"] - 1)
    rng = np.random.default_rng(1)
    alpha, beta, rotvec = rng.normal(size=N_ID), rng.normal(size=N_EXP), [0.1, 0.4, -0.05]
    out = bfm(codes_for(alpha, beta, rotvec))
    expected = expected_vertices(arrays, alpha, beta, rotvec)
    np.testing.assert_allclose(out.vertices[0].numpy(), expected, atol=1e-6)
    keypoints = arrays["keypoints"][0].astype(int) - 1
    np.testing.assert_allclose(out.landmarks[0].numpy(), expected[keypoints], atol=1e-6)
    # fewer components are zero-padded; a 6-d pose uses its first 3 entries (no jaw in BFM)
    few = bfm(codes_for(alpha[:10], beta[:5], list(rotvec) + [0.3, 0.0, 0.0]))
    expected_few = expected_vertices(arrays, alpha[:10], beta[:5], rotvec)
    np.testing.assert_allclose(few.vertices[0].numpy(), expected_few, atol=1e-6)


def test_albedo_is_the_texture_model_in_0_1(tmp_path):
    arrays = write_bfm(tmp_path / "bfm.mat")
    bfm = BFM.from_file(tmp_path / "bfm.mat", n_tex=20)
    mean = arrays["meantex"].reshape(-1, 3) / 255
    np.testing.assert_allclose(bfm.albedo(torch.zeros(1, 20))[0].numpy(), mean, atol=1e-6)
    delta = np.random.default_rng(2).normal(size=20)
    manual = np.clip((arrays["meantex"][0] + arrays["texBase"][:, :20] @ delta) / 255, 0, 1)
    albedo = bfm.albedo(torch.tensor(delta[None], dtype=torch.float32))[0].numpy()
    np.testing.assert_allclose(albedo, manual.reshape(-1, 3), atol=1e-5)


def test_length_unit_is_inferred_from_the_face_width(tmp_path):
    """The same face stored in micrometres (BFM 2009's unit) decodes to the same metres."""
    arrays = write_bfm(tmp_path / "um.mat", unit_scale=1e5)
    bfm = BFM.from_file(tmp_path / "um.mat")
    assert bfm.length_unit == pytest.approx(1e-6)
    rotvec = [0.0, 0.3, 0.0]
    out = bfm(codes_for(np.zeros(N_ID), np.zeros(N_EXP), rotvec))
    np.testing.assert_allclose(out.vertices[0].numpy(),
                               expected_vertices(arrays, [], [], rotvec, unit=1e-6), atol=1e-6)
    width = out.vertices[0, :, 0].max() - out.vertices[0, :, 0].min()
    assert 0.1 < width < 0.2                                          # metres, as FLAME


# ----------------------------------------------------------------------------- rendering
def test_renders_and_its_landmarks_land_on_the_rendered_face(tmp_path):
    write_bfm(tmp_path / "bfm.mat")
    bfm = BFM.from_file(tmp_path / "bfm.mat")
    renderer = Renderer(bfm.faces, 64)
    for rotvec in ([0.0, 0.0, 0.0], [0.2, -0.35, 0.1]):
        codes = codes_for(np.zeros(N_ID), np.zeros(N_EXP), rotvec)
        out = bfm(codes)
        mask = renderer(out.vertices, codes.cam)["mask"][0, 0]
        assert 0.2 < mask.mean() < 0.9
        pixels = normalized_to_pixels(weak_perspective(out.landmarks, codes.cam), 64, 64)[0]
        pixels = pixels.round().long()
        assert mask[pixels[:, 1], pixels[:, 0]].all()


def test_shaded_render_treats_the_whole_visible_mesh_as_face(tmp_path):
    write_bfm(tmp_path / "bfm.mat")
    bfm = BFM.from_file(tmp_path / "bfm.mat")
    codes = codes_for(np.zeros(N_ID), np.zeros(N_EXP), [0.0, 0.2, 0.0])
    codes = codes.replace(tex=torch.zeros(1, N_TEX), light=neutral_light(1))
    out = ShadedFace(bfm, 48)(codes)
    assert torch.equal(out["face_mask"], out["mask"]) and out["mask"].sum() > 300
    assert torch.allclose(out["image"], out["albedo"], atol=1e-5)
    face = out["mask"].bool().expand(-1, 3, -1, -1)
    assert 0.45 < out["image"][face].min() and out["image"][face].max() < 0.95


def test_clockwise_triangles_are_turned_to_face_the_camera(tmp_path):
    write_bfm(tmp_path / "ccw.mat")
    write_bfm(tmp_path / "cw.mat", clockwise=True)
    masks = []
    for name in ("ccw.mat", "cw.mat"):
        bfm = BFM.from_file(tmp_path / name)
        codes = codes_for(np.zeros(N_ID), np.zeros(N_EXP), [0.0, 0.0, 0.0])
        masks.append(Renderer(bfm.faces, 32)(bfm(codes).vertices, codes.cam)["mask"])
    assert masks[0].sum() > 100 and torch.equal(masks[0], masks[1])


# ----------------------------------------------------------------------------- errors
def test_missing_file_names_the_path_and_where_to_register(tmp_path):
    path = tmp_path / "BFM" / "BFM_model_front.mat"
    with pytest.raises(FileNotFoundError) as err:
        BFM.from_file(path)
    message = str(err.value)
    assert str(path) in message and "faces.dmi.unibas.ch" in message
    assert "Deep3DFaceRecon" in message and "01_MorphableModel.mat" in message


def test_bad_files_are_refused_with_the_reason(tmp_path):
    arrays = tiny_bfm_arrays()
    scipy.io.savemat(str(tmp_path / "no_tex.mat"), {k: v for k, v in arrays.items() if k != "texBase"})
    with pytest.raises(ValueError, match="texBase"):
        load_bfm_model(tmp_path / "no_tex.mat")
    scipy.io.savemat(str(tmp_path / "zero_based.mat"), dict(arrays, tri=arrays["tri"] - 1))
    with pytest.raises(ValueError, match="tri must hold 1-based"):
        load_bfm_model(tmp_path / "zero_based.mat")
    backwards = arrays["meanshape"].reshape(-1, 3) * [-1, 1, -1]          # turned to look at -Z
    scipy.io.savemat(str(tmp_path / "backwards.mat"), dict(arrays, meanshape=backwards.reshape(1, -1)))
    with pytest.raises(ValueError, match=r"\+Z"):
        BFM.from_file(tmp_path / "backwards.mat")
    scipy.io.savemat(str(tmp_path / "ok.mat"), arrays)
    with pytest.raises(ValueError, match="n_shape"):
        BFM.from_file(tmp_path / "ok.mat", n_shape=N_ID + 1)
