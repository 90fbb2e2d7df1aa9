"""The Basel Face Model (BFM 2009) in the layout researchers build for Deep3DFaceRecon.

Seed 003 reconstructs faces with BFM (Paysan et al. 2009) plus an expression basis built from
FaceWarehouse (Cao et al. 2013), as the face reconstruction network of Deng et al. 2019 does:

    V = (V_mean + alpha V_id + beta V_exp) R^T + t                          (seed 003, eq. 1)
    albedo = T_mean + delta T_tex

with alpha in R^80 (identity), beta in R^64 (expression), delta in R^80 (texture), on a mesh of
35709 vertices and 70789 triangles (the front of the face, inner mouth removed).

The file
--------
``BFM_model_front.mat`` is not distributed: BFM 2009 needs a (free, non-commercial) registration
at the University of Basel (``BFM_REGISTRATION``), and Deep3DFaceRecon's instructions
(``DEEP3D_INSTRUCTIONS``) turn its ``01_MorphableModel.mat`` plus the expression basis
``Exp_Pca.bin`` into ``BFM_model_front.mat``. It is a MATLAB v5 file read with
``scipy.io.loadmat`` (plain arrays, nothing is executed). Keys read (V = vertices, F = triangles):

==============  ==================  =================================================================
key             shape               meaning
==============  ==================  =================================================================
``meanshape``   1 x 3V              mean shape, x y z interleaved per vertex
``idBase``      3V x n_id (80)      identity basis, one standard deviation per column (same rows)
``exBase``      3V x n_exp (64)     expression basis
``meantex``     1 x 3V              mean albedo, R G B interleaved, 0..255
``texBase``     3V x n_tex (80)     texture basis, 0..255 units
``tri``         F x 3               triangles, 1-based vertex indices (MATLAB)
``keypoints``   1 x 68              vertex of each iBUG landmark, 1-based
==============  ==================  =================================================================

The other keys of that file (``point_buf``: 1-based adjacent triangles per vertex, used there
for normals; ``frontmask2_idx``, ``skinmask``, ``tri_mask2``) are not needed: normals come from
the triangles (``modules.renderer.vertex_normals``).

Conventions (checked on load)
-----------------------------
* Indices: ``tri`` and ``keypoints`` are 1-based and become 0-based (a 0 in them is an error).
* Units: the length unit is inferred from the mean face's width (a face front is about 16 cm wide):
  the power of ten that brings it closest, so BFM 2009's micrometres, the rescaled units of
  Deep3DFaceRecon's conversion (we expect 1e5 micrometres = 0.1 m; the inference does not rely on
  it), millimetres or metres all end up in metres, as FLAME; ``length_unit`` (metres per file
  unit) overrides it. The mean shape is centred on its vertex centroid, so the global
  rotation turns the face about its middle (as Deep3DFaceRecon does).
* Colors: a mean texture above 1 is taken as 0..255 and divided by 255 (basis too); albedo is
  clamped to [0, 1].
* Axes: +X the subject's left, +Y up, +Z out of the face, as FLAME (checked: the nose tip must
  be in front of the jaw line). Triangles are made
  counter-clockwise seen from the front (flipped on load if the file winds them the other way),
  which the renderer's back-face culling expects.

Pose and camera: ``codes.pose[:, :3]`` is the global axis-angle rotation R (BFM has no jaw
joint: the expression basis opens the mouth, so entries 3: of a 6-d pose are not used); the
translation t is the weak-perspective camera's (s, tx, ty) (``modules.renderer.weak_perspective``),
exactly as for FLAME. Landmarks are fixed vertices (no yaw-dependent contour).
"""
import os
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from flame.codes import FaceCodes
from flame.flame import linear_albedo, pad_code, rodrigues

BFM_REGISTRATION = "https://faces.dmi.unibas.ch/bfm/main.php?nav=1-0&id=basel_face_model"
DEEP3D_INSTRUCTIONS = ("https://github.com/sicxu/Deep3DFaceRecon_pytorch (README, 'Prepare "
                       "prerequisite models': 01_MorphableModel.mat and Exp_Pca.bin in its BFM "
                       "folder; BFM_model_front.mat is built from them)")
BFM_FILE = "BFM_model_front.mat"
BFM_KEYS = ("meanshape", "idBase", "exBase", "meantex", "texBase", "tri", "keypoints")
FACE_WIDTH_METRES = 0.16      # typical width of the BFM front-face mesh
SIZES = {"n_shape": 80, "n_exp": 64, "n_tex": 80}


class BFMOutput(NamedTuple):
    vertices: torch.Tensor     # B x V x 3, posed mesh (metres)
    landmarks: torch.Tensor    # B x 68 x 3, the keypoint vertices
    landmarks3d: torch.Tensor  # B x 68 x 3, the same points (BFM has no dynamic contour)


# ----------------------------------------------------------------------------- the file
def missing_bfm_error(path):
    return FileNotFoundError(
        f"{path}: file not found. It should hold the Basel Face Model in Deep3DFaceRecon's layout "
        f"({BFM_FILE}). BFM 2009 needs a free registration at {BFM_REGISTRATION}; build "
        f"{BFM_FILE} from its 01_MorphableModel.mat following {DEEP3D_INSTRUCTIONS}. Without it, "
        "use the open stand-in head model (FLAME.open_head()), which has an albedo basis too.")


def load_bfm_model(path):
    """The arrays of ``BFM_model_front.mat`` (keys ``BFM_KEYS``), checked, as float64 / int64
    numpy arrays with 0-based ``tri`` and ``keypoints``; nothing in the file is executed."""
    import scipy.io
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise missing_bfm_error(path)
    try:
        raw = scipy.io.loadmat(path, variable_names=BFM_KEYS)
    except NotImplementedError as err:                      # MATLAB v7.3 (HDF5)
        raise ValueError(f"{path}: a MATLAB v7.3 file; save it as a v5 .mat (scipy.io.savemat or "
                         "MATLAB's save -v7)") from err
    missing = [k for k in BFM_KEYS if k not in raw]
    if missing:
        raise ValueError(f"{path}: not a {BFM_FILE} (Deep3DFaceRecon layout), arrays {missing} "
                         "are missing")
    model = {k: np.asarray(raw[k], dtype=np.float64) for k in BFM_KEYS}
    n3 = model["meanshape"].size
    for key in ("meanshape", "meantex"):
        model[key] = model[key].reshape(-1)
    for key in ("idBase", "exBase", "texBase"):
        if model[key].ndim != 2 or model[key].shape[0] != n3:
            raise ValueError(f"{path}: {key} must be 3V x n with 3V = {n3} rows (the length of "
                             f"meanshape), got {model[key].shape}")
    if n3 % 3 or model["meantex"].size != n3:
        raise ValueError(f"{path}: meanshape and meantex must both hold 3V values, got {n3} and "
                         f"{model['meantex'].size}")
    if model["tri"].ndim != 2 or model["tri"].shape[1] != 3:
        raise ValueError(f"{path}: tri must be F x 3, got {model['tri'].shape}")
    model["tri"] = zero_based(model["tri"], n3 // 3, "tri", path)
    model["keypoints"] = zero_based(model["keypoints"].reshape(-1), n3 // 3, "keypoints", path)
    if model["keypoints"].size != 68:
        raise ValueError(f"{path}: keypoints must list the 68 landmark vertices, got "
                         f"{model['keypoints'].size}")
    return model


def zero_based(index, n_vertices, key, path):
    """1-based (MATLAB) vertex indices -> 0-based int64, or an error naming the key."""
    if index.min() < 1 or index.max() > n_vertices or np.any(index != np.round(index)):
        raise ValueError(f"{path}: {key} must hold 1-based vertex indices in 1..{n_vertices}, found "
                         f"{index.min():g}..{index.max():g}")
    return index.astype(np.int64) - 1


def infer_length_unit(mean_shape):
    """Metres per file unit: the power of ten that makes the face FACE_WIDTH_METRES wide."""
    width = float(np.ptp(mean_shape[:, 0]))
    if width <= 0:
        raise ValueError("the BFM mean shape has no width; cannot infer its length unit")
    return 10.0 ** np.round(np.log10(FACE_WIDTH_METRES / width))


def counter_clockwise(faces, vertices):
    """Faces wound counter-clockwise seen from +Z (the front): flipped if most area faces away."""
    v0, v1, v2 = (vertices[faces[:, k]] for k in range(3))
    facing = np.cross(v1 - v0, v2 - v0)[:, 2].sum()
    return faces if facing >= 0 else faces[:, [0, 2, 1]]


def check_facing_the_camera(vertices, keypoints):
    """The mean face must look towards +Z: its nose tip (iBUG landmark 30) in front of the ends of
    the jaw line (landmarks 0 and 16)."""
    z = vertices[keypoints, 2]
    if z[30] <= max(z[0], z[16]):
        raise ValueError("the BFM mean face does not look towards +Z (its nose tip, landmark 30, is "
                         "not in front of the jaw line's ends, landmarks 0 and 16): this loader "
                         "expects BFM's axes (+X the subject's left, +Y up, +Z out of the face)")


# ----------------------------------------------------------------------------- the decoder
class BFM(nn.Module):
    """Basel Face Model decoder with FLAME's call interface: codes -> vertices, landmarks.

    ``BFM.from_file(path)`` reads ``BFM_model_front.mat``; ``BFM(model_dict)`` takes the arrays
    of :func:`load_bfm_model`. Sizes default to the file's (80, 64, 80); fewer may be used.
    """

    def __init__(self, model, n_shape=None, n_exp=None, n_tex=None, length_unit=None):
        super().__init__()
        mean = model["meanshape"].reshape(-1, 3)
        unit = infer_length_unit(mean) if length_unit is None else float(length_unit)
        self.length_unit = unit
        self.n_shape = self._size(n_shape, model["idBase"], "n_shape")
        self.n_exp = self._size(n_exp, model["exBase"], "n_exp")
        self.n_tex = self._size(n_tex, model["texBase"], "n_tex")
        color_scale = 255.0 if model["meantex"].max() > 1.0 else 1.0
        basis = lambda b, n: b[:, :n].reshape(len(mean), 3, n)  # noqa: E731  3V x n -> V x 3 x n
        shape_basis = np.concatenate([basis(model["idBase"], self.n_shape),
                                      basis(model["exBase"], self.n_exp)], -1) * unit
        centred = (mean - mean.mean(0, keepdims=True)) * unit
        f32 = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        # buffers come from the licensed file: never saved in checkpoints (persistent=False)
        self.register_buffer("v_template", f32(centred), persistent=False)           # V x 3
        self.register_buffer("shapedirs", f32(shape_basis), persistent=False)        # V x 3 x (id+exp)
        self.register_buffer("albedo_mean", f32(model["meantex"].reshape(-1, 3) / color_scale),
                             persistent=False)
        self.register_buffer("albedo_basis", f32(basis(model["texBase"], self.n_tex) / color_scale),
                             persistent=False)
        check_facing_the_camera(centred, np.asarray(model["keypoints"], np.int64).reshape(-1))
        faces = counter_clockwise(np.asarray(model["tri"], np.int64), centred)
        self.register_buffer("faces", torch.as_tensor(faces), persistent=False)
        self.register_buffer("landmark_indices",
                             torch.as_tensor(np.asarray(model["keypoints"], np.int64).reshape(-1)),
                             persistent=False)
        self.uv_face_mask = None                 # no UVs: the whole visible mesh is the face

    @classmethod
    def from_file(cls, path, n_shape=None, n_exp=None, n_tex=None, length_unit=None):
        return cls(load_bfm_model(path), n_shape, n_exp, n_tex, length_unit)

    @staticmethod
    def _size(n, basis, name):
        available = basis.shape[1]
        if n is None:
            return available
        if n > available:
            raise ValueError(f"the BFM file has {available} components for {name}; asked for {n}")
        return n

    @property
    def num_vertices(self):
        return self.v_template.shape[0]

    @property
    def has_albedo(self):
        return True

    def face_uvs(self):
        """BFM has no UV layout: None (the whole visible mesh counts as the face region)."""
        return None

    def albedo(self, tex):
        """Per-vertex albedo B x V x 3 in [0, 1] (clamped) of texture codes delta, B x (<= n_tex)."""
        return linear_albedo(self.albedo_mean, self.albedo_basis, tex)

    def forward(self, codes=None, exp=None, pose=None, shape=None):
        """``forward(FaceCodes)`` or ``forward(shape=, exp=, pose=)``; pose B x 3 (or more: only
        the global rotation, the first 3 entries, is used)."""
        if isinstance(codes, FaceCodes):
            shape, exp, pose = codes.shape, codes.exp, codes.pose
        elif codes is not None:
            shape = codes
        if pose.shape[1] < 3:
            raise ValueError(f"pose must start with the global axis-angle rotation (3 entries), got "
                             f"{pose.shape[1]}")
        dtype = self.v_template.dtype
        coefficients = torch.cat([pad_code(shape.to(dtype), self.n_shape, "shape"),
                                  pad_code(exp.to(dtype), self.n_exp, "exp")], 1)
        neutral = self.v_template + torch.einsum("bl,vcl->bvc", coefficients, self.shapedirs)
        rotation = rodrigues(pose[:, :3].to(dtype))                               # R
        vertices = neutral @ rotation.transpose(1, 2)                             # eq. 1, t: camera
        landmarks = vertices[:, self.landmark_indices]
        return BFMOutput(vertices, landmarks, landmarks)


__all__ = ["BFM", "BFMOutput", "load_bfm_model", "missing_bfm_error",
           "infer_length_unit", "BFM_REGISTRATION", "DEEP3D_INSTRUCTIONS", "BFM_FILE", "BFM_KEYS"]
