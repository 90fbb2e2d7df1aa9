"""FLAME decoder: M(alpha, beta, theta) = W(T_P(alpha, beta, theta), J(alpha), w) (SAFA eq. 1).

Linear blend skinning with shape, expression and pose-corrective blendshapes over the FLAME
kinematic chain (0 global -> 1 neck -> {2 jaw, 3 left eye, 4 right eye}). Works unchanged with the
real FLAME 2020 files and with the open stand-in head (``flame.open_head``), which share a layout.

Conventions: model units are metres; +X is the subject's left (image right when facing the
camera), +Y up, +Z out of the face towards the camera. Poses are axis-angle vectors. The decoder
accepts SAFA's 6-d pose (global 3 + jaw 3; neck and eyes zero) or the full 15-d pose
(global, neck, jaw, eye_l, eye_r).

Appearance: ``albedo(tex)`` gives per-vertex colors when the asset folder has a per-vertex
albedo model (``vertex_albedo.npz``; the open head has one, FLAME 2020 does not).

Landmarks follow DECA: 68 iBUG points = 17 jaw-contour points chosen by the head's yaw from 79
precomputed contours (yaw rounded to whole degrees and clamped to +-39 degrees) + 51 static points.
"""
import math
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from flame.codes import FaceCodes, full_pose
import flame.loaders as loaders

JOINT_NAMES = ("global", "neck", "jaw", "eye_l", "eye_r")
SHAPE_COMPONENTS_IN_FILE = 300  # FLAME files store 300 shape then 100 expression components
MAX_CONTOUR_YAW = 39            # degrees, DECA's dynamic contour range


class FlameOutput(NamedTuple):
    vertices: torch.Tensor     # B x V x 3, posed mesh M(alpha, beta, theta)
    landmarks: torch.Tensor    # B x 68 x 3, yaw-dependent contour (0-16) + static (17-67)
    landmarks3d: torch.Tensor  # B x 68 x 3, the fixed ("full") embedding
    joints: torch.Tensor       # B x 5 x 3, posed joint locations


# ----------------------------------------------------------------------------- LBS pieces
def rodrigues(rotvec, eps=1e-8):
    """Axis-angle N x 3 -> rotation matrices N x 3 x 3 (R = I + sin(a) K + (1 - cos(a)) K^2)."""
    angle = torch.norm(rotvec + eps, dim=1, keepdim=True)           # N x 1, never exactly 0
    axis = rotvec / angle
    cos, sin = torch.cos(angle)[:, :, None], torch.sin(angle)[:, :, None]
    x, y, z = axis.unbind(1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=1).view(-1, 3, 3)  # K = [axis]_x
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device)[None]
    return eye + sin * skew + (1 - cos) * torch.bmm(skew, skew)


def rigid_chain(rotations, joints, parents):
    """World transforms of a kinematic tree, relative to the rest pose.

    rotations B x J x 3 x 3 (local), joints B x J x 3 (rest positions), parents J (parent index,
    -1 for the root; parents precede children). Returns (posed joints B x J x 3, transforms
    B x J x 4 x 4 that map rest-pose points to posed points for a vertex fully bound to a joint).
    """
    offsets = joints.clone()
    offsets[:, 1:] = joints[:, 1:] - joints[:, parents[1:]]       # bone vectors in the rest pose
    local = torch.cat([rotations, offsets[..., None]], dim=-1)     # B x J x 3 x 4
    bottom = local.new_tensor([0, 0, 0, 1]).expand(*local.shape[:2], 1, 4)
    local = torch.cat([local, bottom], dim=-2)                     # B x J x 4 x 4
    world = [local[:, 0]]
    for j in range(1, len(parents)):
        world.append(world[parents[j]] @ local[:, j])
    world = torch.stack(world, dim=1)
    posed_joints = world[..., :3, 3]
    # remove the rest position: T_j x = R_j (x - J_j) + posed J_j
    shift = (world[..., :3, :3] @ joints[..., None])[..., 0]
    relative = world.clone()
    relative[..., :3, 3] = posed_joints - shift
    return posed_joints, relative


def lbs(betas, pose, v_template, shapedirs, posedirs, J_regressor, parents, weights):
    """Linear blend skinning (FLAME/SMPL family).

    betas B x L, pose B x 3J axis-angle, v_template V x 3, shapedirs V x 3 x L, posedirs
    (9(J-1)) x 3V, J_regressor J x V, parents J, weights V x J. Returns (vertices B x V x 3,
    posed joints B x J x 3).
    """
    batch = pose.shape[0]
    v_shaped = v_template + torch.einsum("bl,vcl->bvc", betas, shapedirs)   # T + B_S + B_E
    rest_joints = torch.einsum("jv,bvc->bjc", J_regressor, v_shaped)        # J(alpha)
    rot = rodrigues(pose.reshape(-1, 3)).view(batch, -1, 3, 3)
    eye = torch.eye(3, dtype=rot.dtype, device=rot.device)
    pose_feature = (rot[:, 1:] - eye).reshape(batch, -1)                     # non-root joints only
    v_posed = v_shaped + (pose_feature @ posedirs).view(batch, -1, 3)        # + B_P(theta)
    posed_joints, transforms = rigid_chain(rot, rest_joints, parents)
    blended = torch.einsum("vj,bjmn->bvmn", weights, transforms)            # B x V x 4 x 4
    verts = (blended[..., :3, :3] @ v_posed[..., None])[..., 0] + blended[..., :3, 3]
    return verts, posed_joints


def yaw_from_rotation(rot):
    """Rotation about the vertical axis (radians) of B x 3 x 3 matrices (y of an x-y-z Euler split)."""
    return torch.atan2(-rot[:, 2, 0], torch.sqrt(rot[:, 0, 0] ** 2 + rot[:, 1, 0] ** 2))


def contour_index_from_yaw(yaw):
    """DECA's indexing of the 79 contours: a = round(-yaw in degrees) clamped to +-39;
    a >= 0 -> a, a < 0 -> 39 - a (so 40..78 hold the negative angles)."""
    a = torch.round(torch.clamp(-yaw * 180.0 / math.pi, -MAX_CONTOUR_YAW, MAX_CONTOUR_YAW)).long()
    return torch.where(a >= 0, a, MAX_CONTOUR_YAW - a)


def contour_yaw_degrees(index):
    """Inverse of :func:`contour_index_from_yaw`: the head yaw (degrees) a contour was built for."""
    a = index if index <= MAX_CONTOUR_YAW else MAX_CONTOUR_YAW - index
    return -float(a)


def pad_code(codes, size, name):
    """B x n codes zero-padded to B x size (n <= size); a longer code is an error naming it."""
    if codes.shape[1] > size:
        raise ValueError(f"{name} code has {codes.shape[1]} entries, the face model uses {size}")
    if codes.shape[1] < size:
        codes = torch.cat([codes, codes.new_zeros(codes.shape[0], size - codes.shape[1])], 1)
    return codes


def linear_albedo(mean, basis, tex):
    """Per-vertex albedo ``clamp(mean + basis . tex, 0, 1)``: mean V x 3, basis V x 3 x n,
    tex B x (<= n) (zero-padded) -> B x V x 3. Clamped so colors stay in [0, 1] (codes far
    from the mean saturate, and get no gradient there)."""
    tex = pad_code(tex.to(basis.dtype), basis.shape[-1], "tex")
    return (mean + torch.einsum("bk,vck->bvc", tex, basis)).clamp(0.0, 1.0)


def points_on_mesh(vertices, faces, face_idx, bary):
    """Barycentric points: vertices B x V x 3, faces F x 3, face_idx B x L, bary B x L x 3."""
    batch = vertices.shape[0]
    corner_ids = faces[face_idx]                                            # B x L x 3
    corners = vertices[torch.arange(batch, device=vertices.device)[:, None, None], corner_ids]
    return (corners * bary[..., None]).sum(dim=2)


# ----------------------------------------------------------------------------- the decoder
class FLAME(nn.Module):
    """FLAME decoder: codes -> vertices, landmarks, joints.

    Build it with :meth:`open_head` (the open stand-in, no registration) or :meth:`from_assets`
    (the real FLAME 2020 files in DECA's folder layout). Its arrays are constants read from those
    files: buffers kept out of state dicts, so checkpoints never carry (licensed) model data.
    """

    def _constant(self, name, value):
        self.register_buffer(name, value, persistent=False)

    def __init__(self, model, landmark_embedding, n_shape=100, n_exp=50, template=None,
                 face_mask=None, shape_components_in_file=SHAPE_COMPONENTS_IN_FILE, albedo=None,
                 n_tex=None, albedo_path=None):
        super().__init__()
        self.n_shape, self.n_exp = n_shape, n_exp
        f32 = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        shapedirs = np.asarray(model["shapedirs"])
        n_file_shape = min(shape_components_in_file, shapedirs.shape[2])
        n_file_exp = shapedirs.shape[2] - shape_components_in_file
        if n_shape > n_file_shape or n_exp > max(n_file_exp, 0):
            raise ValueError(f"the model has {n_file_shape} shape and {max(n_file_exp, 0)} expression "
                             f"components; asked for n_shape={n_shape}, n_exp={n_exp}")
        first_exp = shape_components_in_file
        basis = np.concatenate([shapedirs[:, :, :n_shape],
                                shapedirs[:, :, first_exp:first_exp + n_exp]], 2)
        posedirs = np.asarray(model["posedirs"])
        regressor = model["J_regressor"]
        regressor = regressor.toarray() if hasattr(regressor, "toarray") else np.asarray(regressor)
        parents = np.asarray(model["kintree_table"])[0].astype(np.int64)
        parents[0] = -1                                  # FLAME stores the root's parent as 2**32-1
        self._constant("v_template", f32(model["v_template"]))
        self._constant("shapedirs", f32(basis))                        # V x 3 x (n_shape+n_exp)
        self._constant("posedirs", f32(posedirs.reshape(-1, posedirs.shape[-1]).T))  # P x 3V
        self._constant("J_regressor", f32(regressor))
        self._constant("lbs_weights", f32(model["weights"]))
        self._constant("faces", torch.as_tensor(np.asarray(model["f"]).astype(np.int64)))
        self.parents = [int(p) for p in parents]
        self._register_landmarks(landmark_embedding)
        self._register_uv(template, face_mask)
        self.albedo_path = albedo_path or loaders.ASSET_FILES["albedo"]   # named in errors
        self._register_albedo(albedo, n_tex)

    # .................................................................. construction helpers
    @classmethod
    def from_assets(cls, folder=None, n_shape=100, n_exp=50, n_tex=None, **paths):
        """Real FLAME: ``folder`` holds generic_model.pkl, landmark_embedding.npy, head_template.obj,
        uv_face_mask.png (DECA's data folder + FLAME 2020) and optionally vertex_albedo.npz; single
        paths may be overridden with model_path=, landmark_path=, template_path=,
        face_mask_path=, albedo_path=. ``n_tex``: albedo components used (None: all in the file)."""
        assets = loaders.load_flame_assets(folder, **paths)
        return cls(assets["model"], assets["landmarks"], n_shape, n_exp, assets["template"],
                   assets["face_mask"], albedo=assets["albedo"], n_tex=n_tex,
                   albedo_path=assets["paths"]["albedo"])

    @classmethod
    def open_head(cls, n_shape=100, n_exp=50, cache_dir=None, n_tex=None):
        """The open stand-in head model (generated and cached on first use)."""
        from flame.open_head import ensure_open_head
        return cls.from_assets(ensure_open_head(cache_dir), n_shape=n_shape, n_exp=n_exp,
                               n_tex=n_tex)

    def _register_landmarks(self, emb):
        long = lambda a: torch.as_tensor(np.asarray(a).astype(np.int64))  # noqa: E731
        f32 = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        self._constant("static_lmk_faces_idx", long(emb["static_lmk_faces_idx"]).reshape(-1))
        self._constant("static_lmk_bary_coords",
                             f32(emb["static_lmk_bary_coords"]).reshape(-1, 3))
        self._constant("dynamic_lmk_faces_idx", long(emb["dynamic_lmk_faces_idx"]))  # 79 x 17
        self._constant("dynamic_lmk_bary_coords", f32(emb["dynamic_lmk_bary_coords"]))
        self._constant("full_lmk_faces_idx", long(emb["full_lmk_faces_idx"]).reshape(-1))
        self._constant("full_lmk_bary_coords", f32(emb["full_lmk_bary_coords"]).reshape(-1, 3))

    def _register_uv(self, template, face_mask):
        if template is not None and len(template.get("ft", [])):
            self._constant("uv_coords", torch.as_tensor(template["vt"], dtype=torch.float32))
            self._constant("uv_faces", torch.as_tensor(template["ft"], dtype=torch.int64))
        else:
            self.uv_coords = self.uv_faces = None
        if face_mask is not None:
            mask = torch.as_tensor(face_mask, dtype=torch.float32)[None, None]
            self._constant("uv_face_mask", mask)
        else:
            self.uv_face_mask = None

    def _register_albedo(self, albedo, n_tex):
        """Per-vertex albedo buffers (not saved in checkpoints: they come from the asset files)."""
        if albedo is None:
            if n_tex:
                raise loaders.missing_albedo_error(self.albedo_path)
            self.albedo_mean = self.albedo_basis = None
            self.n_tex = 0
            return
        basis = np.asarray(albedo["basis"])
        n_tex = basis.shape[-1] if n_tex is None else n_tex
        if n_tex > basis.shape[-1]:
            raise ValueError(f"the albedo model has {basis.shape[-1]} components; asked for "
                             f"n_tex={n_tex}")
        if basis.shape[0] != self.num_vertices:
            raise ValueError(f"the albedo model has {basis.shape[0]} vertices, the mesh "
                             f"{self.num_vertices}")
        f32 = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        self._constant("albedo_mean", f32(albedo["mean"]))      # V x 3
        self._constant("albedo_basis", f32(basis[..., :n_tex]))  # V x 3 x n
        self.n_tex = n_tex

    # .................................................................. properties
    @property
    def num_vertices(self):
        return self.v_template.shape[0]

    @property
    def has_albedo(self):
        return self.albedo_mean is not None

    def albedo(self, tex):
        """Per-vertex albedo B x V x 3 in [0, 1] (clamped) of texture codes delta, B x (<= n_tex)."""
        if not self.has_albedo:
            raise loaders.missing_albedo_error(self.albedo_path)
        return linear_albedo(self.albedo_mean, self.albedo_basis, tex)

    def face_uvs(self):
        """F x 3 x 2 UV coordinates of each face corner in grid_sample convention ([-1, 1],
        y down: v = 1 is the top row of the UV images), or None without a template."""
        if self.uv_coords is None:
            return None
        uv = self.uv_coords[self.uv_faces]
        return torch.stack([uv[..., 0] * 2 - 1, 1 - uv[..., 1] * 2], dim=-1)

    # .................................................................. forward
    def forward(self, codes=None, exp=None, pose=None, neck_pose=None, eye_pose=None, shape=None):
        """``forward(FaceCodes)`` or ``forward(shape=, exp=, pose=)``; neck_pose (B x 3) and
        eye_pose (B x 6, left then right) override those parts of a 6-d pose."""
        if isinstance(codes, FaceCodes):
            shape, exp, pose = codes.shape, codes.exp, codes.pose
        elif codes is not None:
            shape = codes
        dtype = self.v_template.dtype
        theta = self._full_pose(pose.to(dtype), neck_pose, eye_pose).to(dtype)
        shape, exp = shape.to(dtype), exp.to(dtype)
        betas = torch.cat([pad_code(shape, self.n_shape, "shape"),
                           pad_code(exp, self.n_exp, "exp")], 1)
        verts, joints = lbs(betas, theta, self.v_template, self.shapedirs, self.posedirs,
                            self.J_regressor, self.parents, self.lbs_weights)
        face_idx, bary = self._landmark_embedding(theta)
        landmarks = points_on_mesh(verts, self.faces, face_idx, bary)
        batch = verts.shape[0]
        full = points_on_mesh(verts, self.faces, self.full_lmk_faces_idx.expand(batch, -1),
                              self.full_lmk_bary_coords.expand(batch, -1, -1))
        return FlameOutput(verts, landmarks, full, joints)

    @staticmethod
    def _full_pose(pose, neck_pose, eye_pose):
        theta = full_pose(pose)
        if neck_pose is not None or eye_pose is not None:
            parts = list(theta.split([3, 3, 3, 6], dim=1))
            if neck_pose is not None:
                parts[1] = neck_pose
            if eye_pose is not None:
                parts[3] = eye_pose
            theta = torch.cat(parts, dim=1)
        return theta

    def _landmark_embedding(self, theta):
        """Faces and barycentrics of the 68 landmarks: contour picked by the neck-chain yaw."""
        batch = theta.shape[0]
        rot = rodrigues(theta[:, :6].reshape(-1, 3)).view(batch, 2, 3, 3)
        head_rot = rot[:, 0] @ rot[:, 1]                                # global then neck
        index = contour_index_from_yaw(yaw_from_rotation(head_rot))
        face_idx = torch.cat([self.dynamic_lmk_faces_idx[index],
                              self.static_lmk_faces_idx.expand(batch, -1)], 1)
        bary = torch.cat([self.dynamic_lmk_bary_coords[index],
                          self.static_lmk_bary_coords.expand(batch, -1, -1)], 1)
        return face_idx, bary
