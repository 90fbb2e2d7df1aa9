"""FLAME decoder, 3DMM codes, restricted asset loaders and the open stand-in head model."""
import os
import pickle
import sys
import types

import numpy as np
import pytest
import scipy.sparse
import torch

from flame import loaders
from flame.codes import FaceCodes, full_pose, relative_codes
from flame.flame import FLAME, contour_index_from_yaw, lbs
from flame.open_head import ensure_open_head, write_open_head


@pytest.fixture(scope="module")
def head_dir():
    return ensure_open_head()          # generated once per machine, deterministic


@pytest.fixture(scope="module")
def flame(head_dir):
    return FLAME.from_assets(head_dir, n_shape=100, n_exp=50)


def codes(batch=2, seed=0, pose_scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return FaceCodes(shape=torch.randn(batch, 100, generator=g),
                     exp=torch.randn(batch, 50, generator=g),
                     pose=torch.randn(batch, 6, generator=g) * pose_scale,
                     cam=torch.tensor([[8.0, 0.0, 0.0]]).repeat(batch, 1))


# ----------------------------------------------------------------------------- LBS
def test_lbs_matches_smplx(head_dir):
    from smplx.lbs import lbs as smplx_lbs
    model = loaders.load_flame_model(os.path.join(head_dir, "generic_model.pkl"))
    d = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    posedirs = d(model["posedirs"]).reshape(-1, 36).T
    regressor = d(model["J_regressor"].toarray())
    parents = torch.tensor([-1, 0, 1, 1, 1])
    g = torch.Generator().manual_seed(1)
    betas = torch.randn(3, 400, generator=g, dtype=torch.float64)
    pose = torch.randn(3, 15, generator=g, dtype=torch.float64) * 0.4
    args = (betas, pose, d(model["v_template"]), d(model["shapedirs"]), posedirs, regressor)
    ours, ours_j = lbs(*args, parents.tolist(), d(model["weights"]))
    ref, ref_j = smplx_lbs(*args, parents, d(model["weights"]))
    assert (ours - ref).abs().max() < 1e-5 and (ours_j - ref_j).abs().max() < 1e-5
    assert (posedirs.abs().sum() > 0) and (ours - d(model["v_template"])).abs().max() > 1e-3


def test_decoder_matches_smplx_lbs_with_its_buffers(flame):
    from smplx.lbs import lbs as smplx_lbs
    c = codes(2, seed=3)
    out = flame(c)
    betas = torch.cat([c.shape, c.exp], 1)
    ref, _ = smplx_lbs(betas, full_pose(c.pose), flame.v_template, flame.shapedirs, flame.posedirs,
                       flame.J_regressor, torch.tensor(flame.parents), flame.lbs_weights)
    assert (out.vertices - ref).abs().max() < 1e-5


def test_six_and_fifteen_dim_pose_agree(flame):
    c = codes(2, seed=4)
    out6 = flame(c)
    out15 = flame(c.replace(pose=full_pose(c.pose)))
    assert torch.allclose(out6.vertices, out15.vertices)
    assert torch.allclose(out6.landmarks, out15.landmarks)
    assert out6.vertices.shape == (2, flame.num_vertices, 3) and out6.landmarks.shape == (2, 68, 3)
    assert out6.joints.shape == (2, 5, 3)


# ----------------------------------------------------------------------------- codes
def test_face_codes_vector_roundtrip_and_tensor_ops():
    c = codes(3, seed=5)
    vec = c.to_vector()
    assert vec.shape == (3, 159)
    back = FaceCodes.from_vector(vec)
    assert all(torch.equal(getattr(back, k), getattr(c, k)) for k in ("shape", "exp", "pose", "cam"))
    with pytest.raises(ValueError, match="add up"):
        FaceCodes.from_vector(vec[:, :-1])
    assert c[1].batch_size == 1 and torch.equal(c[1].exp, c.exp[1:2])
    assert FaceCodes.cat([c[0], c[1:]]).batch_size == 3
    assert c.to(torch.float64).shape.dtype == torch.float64
    arrays = c.to_numpy()
    assert set(arrays) == {"shape", "exp", "pose", "cam"} and arrays["pose"].dtype == np.float32
    assert torch.allclose(FaceCodes.from_numpy(arrays).cam, c.cam)
    with_light = c.replace(light=torch.ones(3, 9, 3))
    assert with_light.to_vector().shape == (3, 159 + 27)


def test_relative_codes_follow_eq22():
    src, drv, ref = codes(1, seed=6), codes(1, seed=7), codes(1, seed=8)
    drv.cam[:, 0], ref.cam[:, 0] = 9.0, 6.0
    rel = relative_codes(src, drv, ref)
    assert torch.equal(rel.shape, src.shape)
    assert torch.allclose(rel.exp, src.exp + drv.exp - ref.exp)
    assert torch.allclose(rel.pose, src.pose + drv.pose - ref.pose)
    assert torch.allclose(rel.cam[:, 0], src.cam[:, 0] * 1.5)
    assert torch.allclose(rel.cam[:, 1:], src.cam[:, 1:] + drv.cam[:, 1:] - ref.cam[:, 1:])


# ----------------------------------------------------------------------------- restricted loading
def _install_fake_chumpy():
    """Fake ``chumpy.ch.Ch`` / ``chumpy.reordering.transpose`` classes so pickle writes those names."""
    pkg, ch, reordering = (types.ModuleType(n) for n in ("chumpy", "chumpy.ch", "chumpy.reordering"))

    class Ch:
        def __init__(self, x):
            self.x, self._dirty_vars, self._itr = np.asarray(x), set(), None

    class transpose:  # noqa: N801 (chumpy's name)
        def __init__(self, a, axes):
            self.a, self.axes, self._dirty_vars = a, axes, set()

    class add:  # noqa: N801 (an operation node this loader does not evaluate)
        def __init__(self, a, b):
            self.a, self.b = a, b

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    transpose.__module__, transpose.__qualname__ = "chumpy.reordering", "transpose"
    ops = types.ModuleType("chumpy.ch_ops")
    add.__module__, add.__qualname__ = "chumpy.ch_ops", "add"
    ch.Ch, reordering.transpose, ops.add = Ch, transpose, add
    modules = {"chumpy": pkg, "chumpy.ch": ch, "chumpy.reordering": reordering, "chumpy.ch_ops": ops}
    sys.modules.update(modules)
    return Ch, transpose, add, list(modules)


def test_restricted_unpickler_reads_flame_pickle_with_chumpy(tmp_path, head_dir):
    model = loaders.load_flame_model(os.path.join(head_dir, "generic_model.pkl"))
    Ch, transpose, add, names = _install_fake_chumpy()
    try:
        chumpy_model = dict(model)
        chumpy_model["J_extra"] = add(Ch(model["J"]), Ch(model["J"]))    # not needed: skipped
        chumpy_model["v_template"] = Ch(model["v_template"])
        chumpy_model["shapedirs"] = transpose(Ch(model["shapedirs"].transpose(1, 0, 2)), (1, 0, 2))
        chumpy_model["J_regressor"] = scipy.sparse.csc_matrix(model["J_regressor"])
        data = pickle.dumps(chumpy_model, protocol=2)
    finally:
        for name in names:
            del sys.modules[name]
    assert b"chumpy.ch" in data and b"chumpy.reordering" in data
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(data)
    with pytest.warns(UserWarning, match="J_extra"):
        loaded = loaders.load_flame_model(path)
    assert "J_extra" not in loaded and isinstance(loaded["v_template"], np.ndarray)
    np.testing.assert_array_equal(loaded["v_template"], model["v_template"])
    np.testing.assert_array_equal(loaded["shapedirs"], model["shapedirs"])
    assert scipy.sparse.issparse(loaded["J_regressor"])
    np.testing.assert_array_equal(loaded["J_regressor"].toarray(), model["J_regressor"].toarray())


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps({"v_template": np.zeros(3), "payload": _Evil(marker)}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        loaders.load_flame_model(path)
    npy = tmp_path / "landmark_embedding.npy"
    np.save(npy, np.array({"static_lmk_faces_idx": _Evil(marker)}, dtype=object), allow_pickle=True)
    with pytest.raises(pickle.UnpicklingError):
        loaders.load_landmark_embedding(npy)
    for name in ("eval", "getattr", "__import__"):      # no builtins beyond inert constructors
        with pytest.raises(pickle.UnpicklingError):
            loaders.RestrictedUnpickler(open(path, "rb")).find_class("builtins", name)
    with pytest.raises(pickle.UnpicklingError):         # torch only where allowed (landmarks)
        loaders.RestrictedUnpickler(open(path, "rb")).find_class("torch._utils", "_rebuild_tensor_v2")
    assert not marker.exists()


def test_landmark_embedding_in_deca_format(head_dir):
    path = os.path.join(head_dir, "landmark_embedding.npy")
    raw = open(path, "rb").read()
    assert b"torch._utils" in raw and b"_rebuild_tensor_v2" in raw   # DECA stores torch tensors
    emb = loaders.load_landmark_embedding(path)
    assert emb["static_lmk_faces_idx"].shape == (51,) and emb["static_lmk_bary_coords"].shape == (51, 3)
    assert emb["dynamic_lmk_faces_idx"].shape == (79, 17)
    assert emb["dynamic_lmk_bary_coords"].shape == (79, 17, 3)
    assert emb["full_lmk_faces_idx"].shape == (1, 68)
    assert emb["full_lmk_bary_coords"].shape == (1, 68, 3)
    np.testing.assert_allclose(emb["static_lmk_bary_coords"].sum(1), 1.0, atol=1e-6)


def test_missing_flame_files_name_the_file_and_registration(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        FLAME.from_assets(tmp_path)
    message = str(err.value)
    assert "generic_model.pkl" in message and "flame.is.tue.mpg.de" in message
    assert str(tmp_path) in message


# ----------------------------------------------------------------------------- the open head
def test_open_head_files_have_flame_layout(head_dir, flame):
    model = loaders.load_flame_model(os.path.join(head_dir, "generic_model.pkl"))
    v = model["v_template"].shape[0]
    assert 2000 < v < 5000
    assert model["shapedirs"].shape == (v, 3, 400) and model["posedirs"].shape == (v, 3, 36)
    assert scipy.sparse.issparse(model["J_regressor"]) and model["J_regressor"].shape == (5, v)
    np.testing.assert_allclose(np.asarray(model["J_regressor"].sum(1)).ravel(), 1.0)
    np.testing.assert_array_equal(model["kintree_table"], [[2 ** 32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]])
    np.testing.assert_allclose(model["weights"].sum(1), 1.0, atol=1e-9)
    assert model["f"].dtype == np.uint32 and model["f"].max() == v - 1
    template = loaders.load_obj(os.path.join(head_dir, "head_template.obj"))
    assert template["ft"].shape == template["f"].shape and template["vt"].min() >= 0
    mask = loaders.load_uv_mask(os.path.join(head_dir, "uv_face_mask.png"))
    assert 0.05 < mask.mean() < 0.5 and set(np.unique(mask.round(2))) >= {0.0, 1.0}
    assert flame.uv_face_mask is not None and flame.face_uvs().shape == (len(model["f"]), 3, 2)


def test_open_head_is_deterministic(tmp_path, head_dir):
    write_open_head(tmp_path)
    a = loaders.load_flame_model(os.path.join(head_dir, "generic_model.pkl"))
    b = loaders.load_flame_model(tmp_path / "generic_model.pkl")
    for key in ("v_template", "shapedirs", "posedirs", "weights", "f"):
        np.testing.assert_array_equal(a[key], b[key])


def _neutral(flame, **changes):
    c = FaceCodes.zeros(1).replace(**changes) if changes else FaceCodes.zeros(1)
    return flame(c)


def test_open_head_landmarks_are_anatomical(flame):
    lm = _neutral(flame).landmarks[0]
    x, y, z = lm.unbind(-1)
    brows, eyes, nose_tip, mouth, chin = y[17:27].mean(), y[36:48].mean(), y[30], y[48:68].mean(), y[8]
    assert brows > eyes > nose_tip > mouth > chin                           # top to bottom
    assert z[30] == z.max()                                                 # the nose tip sticks out
    assert (x[36:42] < 0).all() and (x[42:48] > 0).all()                    # subject's right is -X
    assert (x[:8] < 0).all() and (x[9:17] > 0).all() and abs(x[8]) < 1e-3
    mirror = (list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30]
              + [35, 34, 33, 32, 31] + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
              + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] + [64, 63, 62, 61, 60, 67, 66, 65])
    flipped = lm[mirror] * torch.tensor([-1.0, 1.0, 1.0])
    assert (flipped - lm).abs().max() < 2e-3                                # left-right symmetric


def test_open_head_expressions_and_joints_move_the_right_parts(flame):
    base = _neutral(flame).landmarks[0]
    jaw = _neutral(flame, pose=torch.tensor([[0, 0, 0, 0.3, 0, 0]])).landmarks[0]
    assert (base[66, 1] - base[62, 1]).abs() < 1e-3 and jaw[62, 1] - jaw[66, 1] > 0.015   # mouth opens
    assert (jaw[17:48] - base[17:48]).abs().max() < 1e-4                   # the upper face stays
    exp = torch.zeros(1, 50)
    exp[0, 5] = 1.0                                                                      # blink
    blink = _neutral(flame, exp=exp).landmarks[0]
    open_gap, closed_gap = base[37, 1] - base[41, 1], blink[37, 1] - blink[41, 1]
    assert open_gap > 0.004 and closed_gap < 0.3 * open_gap
    exp = torch.zeros(1, 50)
    exp[0, 0] = 1.5                                                                      # smile
    smile = _neutral(flame, exp=exp).landmarks[0]
    assert smile[48, 1] > base[48, 1] + 0.002 and smile[54, 1] > base[54, 1] + 0.002
    out = flame(FaceCodes.zeros(1), eye_pose=torch.tensor([[0, 0.3, 0, 0, 0.3, 0]]))
    eye_front = flame.J_regressor[3].nonzero()[0, 0]                       # left eyeball's pole
    assert out.vertices[0, eye_front, 0] > _neutral(flame).vertices[0, eye_front, 0] + 0.003


def test_open_head_bases_are_smooth_and_meaningful(flame):
    v = flame.v_template
    width = lambda verts: verts[:, 0].max() - verts[:, 0].min()  # noqa: E731
    assert width(v + 2 * flame.shapedirs[:, :, 0]) > width(v) + 0.005      # component 0: head width
    nose_tip = flame.static_lmk_faces_idx[13]                               # landmark 30
    tip_vertices = flame.faces[nose_tip]
    assert (flame.shapedirs[tip_vertices, 2, 3] > 0.001).all()              # component 3: nose size
    # neighbouring vertices move alike: mean relative difference of displacements along edges,
    # over the edges whose both ends move by more than a tenth of the component's largest motion
    edges = flame.faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    d = flame.shapedirs                                                     # V x 3 x 150
    n = d.norm(dim=1)                                                       # V x 150
    assert (n.amax(0) > 0.0005).all() and (n.amax(0) < 0.03).all()          # metres per unit
    big = (n[edges] > 0.1 * n.amax(0)).all(1)                               # E x 150
    diff = (d[edges[:, 0]] - d[edges[:, 1]]).norm(dim=1) / n[edges].sum(1).clamp_min(1e-12)
    roughness = (diff * big).sum(0) / big.sum(0)
    assert roughness.max() < 0.45 and roughness.median() < 0.25


def test_faces_point_outwards_and_contour_follows_yaw(flame):
    v = flame.v_template
    tri = v[flame.faces]
    volume = (tri[:, 0] * torch.cross(tri[:, 1], tri[:, 2], dim=-1)).sum() / 6
    assert volume > 0                                                       # counter-clockwise outside
    assert contour_index_from_yaw(torch.tensor([0.0])).item() == 0
    assert contour_index_from_yaw(torch.tensor([np.radians(-10.0)])).item() == 10
    assert contour_index_from_yaw(torch.tensor([np.radians(10.0)])).item() == 49
    assert contour_index_from_yaw(torch.tensor([np.radians(80.0)])).item() == 78
    def embedding(deg):
        pose = torch.tensor([[0, np.radians(deg), 0, 0, 0, 0]], dtype=torch.float32)
        return flame._landmark_embedding(full_pose(pose))[0][0]
    assert not torch.equal(embedding(0)[:17], embedding(20)[:17])           # contour slides with yaw
    assert torch.equal(embedding(0)[17:], embedding(20)[17:])               # the 51 others are fixed
    assert torch.equal(embedding(45), embedding(60))                        # clamped at 39 degrees
    # turned by +30 degrees the subject's left cheek turns away: its contour points (10-14) sit
    # on the silhouette, i.e. near the largest x of the mesh at their height
    out = _neutral(flame, pose=torch.tensor([[0, np.radians(30), 0, 0, 0, 0]]))
    verts, lm = out.vertices[0], out.landmarks[0]
    for k in range(10, 15):
        row = verts[(verts[:, 1] - lm[k, 1]).abs() < 0.004]
        assert 0 <= row[:, 0].max() - lm[k, 0] < 0.015


# ----------------------------------------------------------------------------- appearance
def test_face_codes_carry_texture_and_light():
    bands = torch.randn(2, 9, 3)
    c = codes(2, seed=9).replace(tex=torch.randn(2, 50), light=bands)
    assert c.light.shape == (2, 27) and torch.equal(bands[:, 4], c.light[:, 12:15])   # band-major
    assert c.sizes == {"shape": 100, "exp": 50, "pose": 6, "cam": 3, "tex": 50, "light": 27}
    back = FaceCodes.from_vector(c.to_vector(), n_tex=50, n_light=27)
    assert torch.equal(back.tex, c.tex) and torch.equal(back.light, c.light)
    arrays = c.to_numpy()                                     # the .flame.npz sidecar layout
    assert arrays["tex"].shape == (2, 50) and arrays["light"].shape == (2, 27)
    arrays["eye_pose"] = np.zeros((2, 6), np.float32)         # other sidecar arrays: ignored
    again = FaceCodes.from_numpy(arrays)
    assert torch.allclose(again.light, c.light) and torch.allclose(again.tex, c.tex)
    one_frame = FaceCodes.from_numpy({k: v[1] for k, v in arrays.items()})
    assert one_frame.batch_size == 1 and torch.allclose(one_frame.light, c.light[1:])
    assert torch.equal(c[1].light, c.light[1:]) and FaceCodes.cat([c, c]).tex.shape == (4, 50)
    assert FaceCodes.zeros(3, n_tex=50).tex.abs().sum() == 0 and FaceCodes.zeros(1).tex is None


def _nearest_vertices(flame, points):
    return torch.cdist(points, flame.v_template).argmin(-1)


def test_open_head_albedo_paints_the_right_places(flame, head_dir):
    from flame.open_head import ALBEDO_COMPONENTS, N_TEX_FILE, Topology
    stored = loaders.load_vertex_albedo(os.path.join(head_dir, "vertex_albedo.npz"))
    assert stored["basis"].shape == (flame.num_vertices, 3, N_TEX_FILE) and flame.n_tex == N_TEX_FILE
    assert stored["names"][:len(ALBEDO_COMPONENTS)] == [name for name, _, _ in ALBEDO_COMPONENTS]
    lm = _neutral(flame).landmarks[0]
    at = lambda colors, idx: colors[_nearest_vertices(flame, lm[idx])]  # noqa: E731
    names = [name for name, _, _ in ALBEDO_COMPONENTS]
    mean = flame.albedo(torch.zeros(1, N_TEX_FILE))[0]
    nose, lips, brows = list(range(27, 36)), list(range(48, 60)), list(range(17, 27))
    redness = lambda c: (c[:, 0] / c[:, 1]).mean()  # noqa: E731
    assert redness(at(mean, lips)) > redness(at(mean, nose)) + 0.15          # red lips
    assert at(mean, brows).sum(-1).mean() < at(mean, nose).sum(-1).mean() - 0.5   # dark brows
    eyes = torch.zeros(flame.num_vertices, dtype=torch.bool)
    for start, stop in Topology().eye_ranges:
        eyes[start:stop] = True
    for name, region, unaffected in (("skin_lightness", nose, None), ("lip_color", lips, nose),
                                     ("iris_color", None, nose + lips + brows)):
        tex = torch.zeros(1, N_TEX_FILE)
        tex[0, names.index(name)] = 1.0
        change = (flame.albedo(tex)[0] - mean).abs().sum(-1)
        if region is not None:
            assert change[_nearest_vertices(flame, lm[region])].mean() > 0.04, name
        if unaffected is not None:
            assert change[_nearest_vertices(flame, lm[unaffected])].max() < 1e-6, name
        if name == "iris_color":
            assert change[eyes].max() > 0.1 and change[~eyes].max() < 1e-6
        if name == "skin_lightness":
            assert change[eyes].max() < 1e-6
    far = flame.albedo(torch.full((2, N_TEX_FILE), 3.0) * torch.tensor([[1.0], [-1.0]]))
    assert far.min() >= 0 and far.max() <= 1                                 # clamped to [0, 1]


def test_flame_without_albedo_names_the_file_it_needs(tmp_path, head_dir):
    import shutil
    for name in ("generic_model.pkl", "landmark_embedding.npy"):
        shutil.copy(os.path.join(head_dir, name), tmp_path / name)
    plain = FLAME.from_assets(tmp_path)
    assert not plain.has_albedo and plain.n_tex == 0
    with pytest.raises(FileNotFoundError) as err:
        plain.albedo(torch.zeros(1, 10))
    message = str(err.value)
    assert str(tmp_path / "vertex_albedo.npz") in message and "FLAME_texture.npz" in message
    with pytest.raises(FileNotFoundError, match="vertex_albedo.npz"):
        FLAME.from_assets(tmp_path, n_tex=10)
    with pytest.raises(ValueError, match="n_tex=51"):
        FLAME.from_assets(head_dir, n_tex=51)
    assert FLAME.from_assets(head_dir, n_tex=10).albedo_basis.shape[-1] == 10
