"""Typed 3DMM codes: the one structure every model passes around instead of a bare code vector.

SAFA's layout (paper section 4.1, ``Phi = (alpha, beta, theta, c)``) is the default:

============  =====  =====================================================================
field         size   meaning
============  =====  =====================================================================
``shape``     100    alpha, FLAME identity coefficients (units of one standard deviation)
``exp``       50     beta, FLAME expression coefficients
``pose``      6      theta, axis-angle: global rotation (3) then jaw (3); neck and eyes are
                     zero. A full 15-vector (global, neck, jaw, left eye, right eye) is
                     accepted too.
``cam``       3      c = (s, tx, ty), weak-perspective camera (see ``modules.renderer``)
``tex``       opt.   delta, albedo (texture basis) coefficients, for face models with an albedo
                     basis (the open head: 50, BFM: 80; units of one standard deviation)
``light``     opt.   gamma, spherical-harmonics lighting: 27 = 9 bands x RGB, stored B x 27
                     band-major (``light.view(B, 9, 3)[:, band, channel]``); a B x 9 x 3 tensor
                     is flattened on construction. Basis, constants and the B x 9 x 3 view
                     (``light_bands``): ``modules.shading``.
============  =====  =====================================================================

``to_vector`` concatenates the fields in exactly the order of ``FIELD_ORDER`` (shape, exp, pose,
cam, then tex and light when present); ``from_vector`` splits it back given the sizes. The default
vector is SAFA's 159-vector: 100 + 50 + 6 + 3; with appearance (seed 003's (alpha, beta, delta,
gamma, p)) the texture and light follow it: 159 + n_tex + 27.

The ``<stem>.flame.npz`` sidecars hold one T x n array per field (``to_numpy`` / ``from_numpy``);
``tex`` and ``light`` are optional there too.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

FIELD_ORDER = ("shape", "exp", "pose", "cam", "tex", "light")
REQUIRED_FIELDS = ("shape", "exp", "pose", "cam")
DEFAULT_SIZES = {"shape": 100, "exp": 50, "pose": 6, "cam": 3, "tex": 0, "light": 0}


@dataclass
class FaceCodes:
    shape: torch.Tensor  # alpha, B x n_shape
    exp: torch.Tensor    # beta, B x n_exp
    pose: torch.Tensor   # theta, B x 6 (global, jaw) or B x 15 (global, neck, jaw, eye_l, eye_r)
    cam: torch.Tensor    # c = (s, tx, ty), B x 3
    tex: Optional[torch.Tensor] = None    # delta, B x n_tex
    light: Optional[torch.Tensor] = None  # gamma, B x 27 (9 SH bands x RGB, band-major)

    def __post_init__(self):
        if self.light is not None and self.light.dim() > 2:      # B x 9 x 3 -> B x 27
            self.light = self.light.reshape(self.light.shape[0], -1)

    # ------------------------------------------------------------------ structure
    def fields(self):
        """``(name, tensor)`` pairs of the present fields, in ``FIELD_ORDER``."""
        return [(name, getattr(self, name)) for name in FIELD_ORDER if getattr(self, name) is not None]

    @property
    def batch_size(self):
        return self.shape.shape[0]

    @property
    def sizes(self):
        """Size of each present field (light counted flattened)."""
        return {name: int(np.prod(value.shape[1:])) for name, value in self.fields()}

    @property
    def global_pose(self):
        return self.pose[:, :3]

    @property
    def jaw_pose(self):
        return self.pose[:, 3:6] if self.pose.shape[1] == 6 else self.pose[:, 6:9]

    @property
    def scale(self):
        return self.cam[:, :1]

    @property
    def translation(self):
        return self.cam[:, 1:3]

    # ------------------------------------------------------------------ vector form
    def to_vector(self):
        """B x sum(sizes): the fields concatenated in ``FIELD_ORDER``."""
        return torch.cat([value.reshape(value.shape[0], -1) for _, value in self.fields()], dim=1)

    @classmethod
    def from_vector(cls, vector, n_shape=100, n_exp=50, n_pose=6, n_cam=3, n_tex=0, n_light=0):
        """Split a B x N vector laid out as ``to_vector`` writes it; sizes must add up to N."""
        sizes = [("shape", n_shape), ("exp", n_exp), ("pose", n_pose), ("cam", n_cam),
                 ("tex", n_tex), ("light", n_light)]
        total = sum(size for _, size in sizes)
        if vector.shape[-1] != total:
            raise ValueError(f"code vector has {vector.shape[-1]} entries but the sizes "
                             f"{dict(sizes)} add up to {total}")
        parts, start = {}, 0
        for name, size in sizes:
            if size or name in REQUIRED_FIELDS:
                parts[name] = vector[:, start:start + size]
            start += size
        return cls(**parts)

    @classmethod
    def zeros(cls, batch_size, n_shape=100, n_exp=50, n_pose=6, scale=10.0, device=None,
              dtype=torch.float32, n_tex=0):
        """Neutral codes: mean shape, no expression, frontal pose, camera (scale, 0, 0); with
        ``n_tex`` > 0 also the mean albedo (zero ``tex``). For a neutral light see
        ``modules.shading.neutral_light``."""
        z = lambda n: torch.zeros(batch_size, n, device=device, dtype=dtype)  # noqa: E731
        cam = z(3)
        cam[:, 0] = scale
        return cls(shape=z(n_shape), exp=z(n_exp), pose=z(n_pose), cam=cam,
                   tex=z(n_tex) if n_tex else None)

    # ------------------------------------------------------------------ tensor-like
    def _map(self, fn):
        return FaceCodes(**{name: fn(value) for name, value in self.fields()})

    def __getitem__(self, index):
        """Batch indexing (int, slice, tensor); an int keeps the batch dimension."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return self._map(lambda t: t[index])

    def detach(self):
        return self._map(lambda t: t.detach())

    def clone(self):
        return self._map(lambda t: t.clone())

    def to(self, *args, **kwargs):
        return self._map(lambda t: t.to(*args, **kwargs))

    def pin_memory(self):
        """Page-locked copies (the DataLoader calls this with ``pin_memory=True``)."""
        return self._map(lambda t: t.pin_memory())

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @staticmethod
    def cat(codes_list):
        first = codes_list[0]
        names = [name for name, _ in first.fields()]
        return FaceCodes(**{n: torch.cat([getattr(c, n) for c in codes_list], 0) for n in names})

    # ------------------------------------------------------------------ numpy sidecars
    def to_numpy(self):
        """Dict of float32 arrays (the ``<stem>.flame.npz`` sidecar layout)."""
        return {name: value.detach().cpu().numpy().astype(np.float32) for name, value in self.fields()}

    @classmethod
    def from_numpy(cls, arrays, device=None, dtype=torch.float32):
        """FaceCodes from a dict of arrays (an opened ``.flame.npz`` sidecar: T x n each, or one
        frame of it: n each, which becomes a batch of 1); the optional ``tex`` and ``light`` are
        taken when present, other keys (``eye_pose``) ignored."""
        names = [n for n in FIELD_ORDER if n in arrays]
        missing = [n for n in REQUIRED_FIELDS if n not in arrays]
        if missing:
            raise KeyError(f"3DMM code arrays lack {missing}")
        as_batch = lambda a: a[None] if a.ndim == 1 else a  # noqa: E731
        return cls(**{n: torch.as_tensor(as_batch(np.asarray(arrays[n])), dtype=dtype, device=device)
                      for n in names})


def full_pose(pose):
    """B x 6 (global, jaw) or B x 15 pose -> B x 15 (global, neck, jaw, eye_l, eye_r)."""
    if pose.shape[-1] == 15:
        return pose
    if pose.shape[-1] != 6:
        raise ValueError(f"pose must have 6 (global, jaw) or 15 entries, got {pose.shape[-1]}")
    zeros = pose.new_zeros(pose.shape[0], 3)
    return torch.cat([pose[:, :3], zeros, pose[:, 3:6], zeros, zeros], dim=1)


def relative_codes(source, driving, reference):
    """Codes of the relatively reenacted frame S_t, SAFA appendix B eq. 22.

    Phi_{S_t} = (alpha_S, beta_S + beta_{D_t} - beta_{D_r}, theta_S + theta_{D_t} - theta_{D_r},
                 (s_S * s_{D_t} / s_{D_r}, t_S + t_{D_t} - t_{D_r})).
    ``driving`` and ``reference`` broadcast against ``source`` over the batch.
    """
    scale = source.cam[:, :1] * driving.cam[:, :1] / reference.cam[:, :1]
    trans = source.cam[:, 1:] + driving.cam[:, 1:] - reference.cam[:, 1:]
    return source.replace(exp=source.exp + driving.exp - reference.exp,
                          pose=source.pose + driving.pose - reference.pose,
                          cam=torch.cat([scale, trans], dim=1))
