"""Albedo and spherical-harmonics lighting of a 3DMM face, the shaded render and its photometric loss.

Seed 003 renders the target face "with computed color according to the texture and illumination
of the source face" (I_r): every vertex gets the color albedo * shading, then the mesh is
rasterized (eq. 2, per-vertex attributes). Illumination is gamma in R^27: 9 spherical-harmonics
(SH) coefficients per color channel, the Lambertian model of Deng et al. 2019 (the face
reconstruction network that paper uses):

    color(v) = albedo(v) * sum_b gamma_{b, c} Phi_b(n_v)            per channel c, b = 0..8

Basis Phi_b: irradiance SH of Ramamoorthi & Hanrahan 2001 ("An efficient representation for
irradiance environment maps"): the real SH Y_lm up to band l = 2 times the clamped-cosine
convolution factors A_0 = pi, A_1 = 2 pi / 3, A_2 = pi / 4, so ``gamma`` holds the SH of the
incoming radiance and the sum is the irradiance. With n = (x, y, z) the unit normal:

====  ============================  =================================
 b    Phi_b(n)                      constant
====  ============================  =================================
 0    c0                            c0 = pi * 0.282095 = 0.886227
 1    c1 * y                        c1 = 2 pi / 3 * 0.488603 = 1.023328
 2    c1 * z
 3    c1 * x
 4    c2 * x y                      c2 = pi / 4 * 1.092548 = 0.858086
 5    c2 * y z
 6    c3 * (3 z^2 - 1)              c3 = pi / 4 * 0.315392 = 0.247708
 7    c2 * x z
 8    c4 * (x^2 - y^2)              c4 = pi / 4 * 0.546274 = 0.429043
====  ============================  =================================

Layout of the light code (``FaceCodes.light``, B x 27): band-major, RGB inner, i.e.
``light.view(B, 9, 3)[:, b, c]`` is gamma_{b, c}. Normals are in camera space as
``modules.renderer.vertex_normals`` gives them: x right, y up, z towards the camera (the weak
perspective camera does not rotate, so model space after the pose is camera space).
``neutral_light`` (gamma_0 = 1 / c0 on every channel, the rest 0) shades every normal with 1, so
the render is the albedo itself; the 3DMM encoder starts from it.

The photometric loss is Deng et al.'s: the per-pixel Euclidean (L2, not squared) norm of the RGB
difference, summed over the face region and divided by the region's size, a robust loss (an
outlier pixel costs its distance, not its square).
"""
import math

import torch
from torch import nn

from flame.codes import FaceCodes
from modules.face_maps import render_face_region
from modules.renderer import Renderer, vertex_normals, weak_perspective

SH_BANDS = 9                                   # l <= 2
LIGHT_DIM = SH_BANDS * 3                       # gamma in R^27
_Y0, _Y1, _Y2, _Y20, _Y22 = (0.5 / math.sqrt(math.pi), math.sqrt(3 / (4 * math.pi)),
                             0.5 * math.sqrt(15 / math.pi), 0.25 * math.sqrt(5 / math.pi),
                             0.25 * math.sqrt(15 / math.pi))
SH_CONSTANTS = {                               # A_l * (normalization of Y_lm)
    "c0": math.pi * _Y0,
    "c1": 2 * math.pi / 3 * _Y1,
    "c2": math.pi / 4 * _Y2,
    "c3": math.pi / 4 * _Y20,
    "c4": math.pi / 4 * _Y22,
}


# ----------------------------------------------------------------------------- SH lighting
def sh_basis(normals):
    """``... x 3`` unit normals -> ``... x 9`` irradiance basis Phi_b(n) (table in the docstring)."""
    x, y, z = normals.unbind(-1)
    k = SH_CONSTANTS
    return torch.stack([torch.full_like(x, k["c0"]), k["c1"] * y, k["c1"] * z, k["c1"] * x,
                        k["c2"] * x * y, k["c2"] * y * z, k["c3"] * (3 * z * z - 1),
                        k["c2"] * x * z, k["c4"] * (x * x - y * y)], dim=-1)


def light_bands(light):
    """Light codes ``B x 27`` (or ``B x 9 x 3``) -> ``B x 9 x 3`` (band, channel)."""
    if light.shape[1:].numel() != LIGHT_DIM:
        raise ValueError(f"light codes must hold {LIGHT_DIM} = 9 SH bands x RGB values per sample, "
                         f"got shape {tuple(light.shape)}")
    return light.reshape(light.shape[0], SH_BANDS, 3)


def sh_shading(normals, light):
    """Irradiance per point and channel: normals ``B x N x 3``, light ``B x 27`` -> ``B x N x 3``."""
    return torch.einsum("bnk,bkc->bnc", sh_basis(normals), light_bands(light).to(normals.dtype))


def neutral_light(batch_size, device=None, dtype=torch.float32):
    """``B x 27`` ambient white light of irradiance 1: shading it reproduces the albedo."""
    light = torch.zeros(batch_size, SH_BANDS, 3, device=device, dtype=dtype)
    light[:, 0] = 1.0 / SH_CONSTANTS["c0"]
    return light.reshape(batch_size, LIGHT_DIM)


def directional_light(direction, intensity=1.0, ambient=0.0, color=(1.0, 1.0, 1.0)):
    """SH codes ``B x 27`` of a distant light plus an ambient term.

    direction: ``B x 3`` (towards the light, camera space; normalized here). The light's radiance
    projects to gamma_b = intensity * Y_b(direction), whose irradiance approximates
    ``intensity * max(0, n . direction)`` (Ramamoorthi & Hanrahan); ``ambient`` adds a constant
    irradiance. ``color`` (3 or ``B x 3``) scales the channels. ``intensity``/``ambient``: float
    or ``B``.
    """
    d = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = SH_CONSTANTS
    # Y_b(d) = Phi_b(d) / A_l: divide the irradiance basis by the band's convolution factor
    factors = d.new_tensor([math.pi] + [2 * math.pi / 3] * 3 + [math.pi / 4] * 5)
    radiance = sh_basis(d) / factors                                         # B x 9
    as_batch = lambda v: torch.as_tensor(v, dtype=d.dtype, device=d.device).reshape(-1, 1)  # noqa: E731
    gamma = as_batch(intensity) * radiance
    gamma[:, 0] = gamma[:, 0] + as_batch(ambient)[:, 0] / k["c0"]
    rgb = torch.as_tensor(color, dtype=d.dtype, device=d.device).reshape(-1, 1, 3)
    return (gamma[:, :, None] * rgb).reshape(d.shape[0], LIGHT_DIM)


def shade_vertices(albedo, normals, light):
    """Per-vertex colors albedo * shading: albedo and normals ``B x V x 3``, light ``B x 27``."""
    return albedo * sh_shading(normals, light)


# ----------------------------------------------------------------------------- the shaded render
def reenactment_codes(source, driving):
    """Seed 003's target codes v_t = (alpha_s, beta_d, delta_s, gamma_s, p_d): identity, texture
    and illumination of the source, expression (and jaw) and pose (and camera) of the driving."""
    return source.replace(exp=driving.exp, pose=driving.pose, cam=driving.cam)


class ShadedFace(nn.Module):
    """``ShadedFace(face_model, image_size)(codes) -> dict``: the face rendered with its albedo
    and SH light (seed 003's I_r for the target codes).

    ``face_model``: FLAME (with an albedo basis, e.g. ``FLAME.open_head()``) or ``flame.bfm.BFM``;
    anything with ``faces``, ``__call__(codes) -> .vertices, .landmarks``, ``albedo(tex)``,
    ``face_uvs()`` and optionally ``uv_face_mask``.

    Output keys (H x W = ``image_size``):
      image       B x 3 x H x W   albedo * shading where the mesh is visible, 0 elsewhere
      albedo      B x 3 x H x W   rendered albedo (same mask)
      shading     B x 3 x H x W   rendered irradiance (same mask)
      face_mask   B x 1 x H x W   {0, 1}: the face region (UV face mask, eyes and mouth excluded,
                                  for models with UVs; the whole visible mesh for BFM)
      mask        B x 1 x H x W   {0, 1}: any visible part of the mesh
      vertices    B x V x 3;  landmarks  B x 68 x 2 (normalized image coordinates)
      fragments   the rasterization (``modules.renderer.Fragments``)

    ``geometry_gradients``: with True (default) gradients of the render reach the geometry
    (shape, expression, pose, camera) through the rasterized positions (barycentric coordinates)
    as well as through the normals' shading; with False the pixel coverage is a constant and only
    the colors (albedo, light, normals) carry gradients. PyTorch3D's CPU backward of the
    rasterization costs about three forwards, so CPU pretraining runs may turn it off.
    """

    def __init__(self, face_model, image_size=64, renderer=None, mask_threshold=0.5,
                 geometry_gradients=True):
        super().__init__()
        self.face_model = face_model
        self.geometry_gradients = geometry_gradients
        self.renderer = renderer if renderer is not None else Renderer(face_model.faces, image_size)
        self.image_size = image_size
        self.mask_threshold = mask_threshold
        self.register_buffer("face_uvs", face_model.face_uvs(), persistent=False)
        mask = getattr(face_model, "uv_face_mask", None) if self.face_uvs is not None else None
        self.register_buffer("uv_face_mask", mask, persistent=False)

    def vertex_colors(self, codes, vertices):
        """(color, albedo, shading), each ``B x V x 3``, for posed ``vertices``."""
        if codes.light is None:
            raise ValueError("the codes carry no light: set FaceCodes.light (B x 27 SH "
                             "coefficients), e.g. modules.shading.neutral_light(batch_size)")
        tex = codes.tex if codes.tex is not None else vertices.new_zeros(vertices.shape[0], 0)
        albedo = self.face_model.albedo(tex).to(vertices.dtype)
        shading = sh_shading(vertex_normals(vertices, self.renderer.faces), codes.light)
        return albedo * shading, albedo, shading

    def forward(self, codes: FaceCodes, image_size=None):
        out = self.face_model(codes)
        color, albedo, shading = self.vertex_colors(codes, out.vertices)
        size = self.image_size if image_size is None else image_size
        vertices, cam = out.vertices, codes.cam
        if not self.geometry_gradients:                  # coverage fixed; colors differentiable
            vertices, cam = vertices.detach(), cam.detach()
        maps, face_mask, fragments = render_face_region(
            self.renderer, vertices, cam, torch.cat([color, albedo, shading], -1),
            self.face_uvs, self.uv_face_mask, size, self.mask_threshold)
        return {"image": maps[:, 0:3], "albedo": maps[:, 3:6], "shading": maps[:, 6:9],
                "face_mask": face_mask, "mask": fragments.mask, "vertices": out.vertices,
                "landmarks": weak_perspective(out.landmarks, codes.cam), "fragments": fragments}


# ----------------------------------------------------------------------------- losses
def photometric_loss(rendered, image, mask, weights=None, eps=1e-12):
    """Deng et al.'s photometric loss: ``sum_i A_i ||I_i - I'_i||_2 / sum_i A_i`` over the pixels i
    of the face region.

    rendered, image: ``B x 3 x H x W``; mask: ``B x 1 x H x W`` face region (the rendered
    ``face_mask``); weights: optional ``B x 1 x H x W`` per-pixel weights A (e.g. a skin
    probability), 1 by default. The norm is the per-pixel Euclidean norm of the RGB difference
    (``eps`` inside the square root keeps its gradient finite at 0). Sums run over the whole
    batch; an empty region gives 0.
    """
    if rendered.shape != image.shape:
        raise ValueError(f"rendered {tuple(rendered.shape)} and image {tuple(image.shape)} differ "
                         "in shape; render at the image size")
    weight = mask if weights is None else mask * weights
    distance = ((rendered - image) ** 2).sum(1, keepdim=True).add(eps).sqrt()
    return (distance * weight).sum() / weight.sum().clamp_min(1.0)


def texture_regularization(codes):
    """``||delta||^2`` per sample, batch mean (Deng et al.'s texture term of L_coef)."""
    if codes.tex is None:
        raise ValueError("the codes carry no texture coefficients (FaceCodes.tex)")
    return (codes.tex ** 2).sum(1).mean()


def light_color_regularization(codes):
    """Squared deviation of each SH coefficient from its mean over R, G, B (sum over the 27,
    batch mean): favours white light, so color goes to the albedo rather than to the light."""
    if codes.light is None:
        raise ValueError("the codes carry no light (FaceCodes.light)")
    bands = light_bands(codes.light)
    return ((bands - bands.mean(-1, keepdim=True)) ** 2).sum((1, 2)).mean()


APPEARANCE_LOSS_WEIGHTS = {
    # Our choices for the 3DMM pretraining, next to SAFA's landmark + shape/expression terms (eq.
    # 18): no paper gives weights for this combination. The photometric weight is Deng et al.'s
    # (1.92); the texture weight is a tenth of SAFA's lambda_alpha (1e-2), so color is explained
    # by the image before the prior; the light-color weight only breaks the albedo / light-tint
    # ambiguity. On a synthetic frame fitted from the mean codes, these bring the photometric
    # loss from 0.41 to 0.05 in 150 Adam steps while the landmark + regularization term falls
    # from 22 to 1.6.
    "photometric": 1.92,
    "texture_regularization": 1.0e-3,
    "light_color_regularization": 1.0e-1,
}


def appearance_loss(rendered, image, face_mask, codes, weights=APPEARANCE_LOSS_WEIGHTS,
                    pixel_weights=None):
    """Weighted sum of the photometric loss and the texture / light-color regularizers; returns
    ``(total, {term: value})`` (no texture term for codes without ``tex``). Add it to the
    landmark + code regularization loss of the encoder's pretraining."""
    terms = {"photometric": photometric_loss(rendered, image, face_mask, pixel_weights),
             "light_color_regularization": light_color_regularization(codes)}
    if codes.tex is not None:               # an encoder may regress light without albedo codes
        terms["texture_regularization"] = texture_regularization(codes)
    total = sum(weights[name] * value for name, value in terms.items())
    return total, terms


__all__ = ["SH_CONSTANTS", "LIGHT_DIM", "sh_basis", "light_bands", "sh_shading", "neutral_light",
           "directional_light", "shade_vertices", "reenactment_codes", "ShadedFace",
           "photometric_loss", "texture_regularization", "light_color_regularization",
           "APPEARANCE_LOSS_WEIGHTS", "appearance_loss"]
