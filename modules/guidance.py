"""Geometric guidance of the progressive-warping model (seed 001, section 3.2), rendered from
3DMM codes.

Four kinds, one switch (``guidance``):

==================  ==================================  =========================================
kind                encoder input (with the source)      decoder guidance (SPADE condition)
==================  ==================================  =========================================
``geom_disp``       nothing                              D: 2 channels, on the driving mesh
``neural_codes``    E rendered on the source mesh (d)    E rendered on the driving mesh (d)
``both``            E on the source mesh (d)             D (2) then E on the driving mesh (d)
``nmfc``            NMFC of the source mesh (3)          NMFC of the driving mesh (3)
==================  ==================================  =========================================

- Geometric displacement: per vertex ``V_i = P(M_S)_i - P(M_D)_i`` (the projected source minus
  driving position, normalized image coordinates, x right, y down), rasterized on the driving
  mesh with back faces culled: at a driving pixel z on the face, ``z + D(z)`` is where that
  surface point is in the source image, i.e. ``make_coordinate_grid + D`` is a backward flow.
  Zero off the face.
- Posed neural codes: a learned d-dimensional vector per vertex (``vertex_codes``, an
  ``nn.Parameter`` V x d, d = 16 in the paper), rasterized on the source and on the driving mesh;
  gradients reach the codes through the interpolation.
- NMFC (normalized mean-face coordinates, the Table 1 baseline row): each vertex's position on
  the mean face (zero shape, expression and pose) scaled to [0, 1] per axis, used as its color
  and rendered on the posed mesh. The paper gives the baseline only as a row of Table 1; we feed
  it exactly where the neural codes go (source render to the encoder, driving render to the
  decoder), the fixed-color counterpart of the learned codes.

Rendering uses ``modules.renderer.Renderer`` (weak perspective, z-buffer, back faces culled),
differentiable in the vertex attributes and the vertices. The face model is called as
``face_model(FaceCodes) -> .vertices`` and provides ``faces`` (F x 3), ``n_shape`` and ``n_exp``
(``flame.FLAME``; a BFM decoder with the same interface works unchanged).
"""
from typing import NamedTuple, Optional

import torch
from torch import nn

from flame.codes import FaceCodes
from modules.renderer import Renderer, screen_vertices, weak_perspective
from modules.precision import full_precision

GUIDANCE_KINDS = ("geom_disp", "neural_codes", "both", "nmfc")
DISPLACEMENT_CHANNELS = 2
NMFC_CHANNELS = 3


class GuidanceMaps(NamedTuple):
    """What :class:`GuidanceRenderer` returns (H x W = the render size).

    encoder_input:     B x C_e x H x W to concatenate to the source image, or None (geom_disp)
    decoder_guidance:  B x C_d x H x W, the PWM's SPADE condition; when the kind has a geometric
                       displacement, it is the first 2 channels
    driving_mask:      B x 1 x H x W, 1 where the driving mesh is visible
    """
    encoder_input: Optional[torch.Tensor]
    decoder_guidance: torch.Tensor
    driving_mask: torch.Tensor


def with_source_shape(source, driving):
    """Driving codes carrying the source's identity (shape): the authors' code does this at
    inference, so a cross-identity driver moves the source's own face."""
    return driving.replace(shape=source.shape)


def mean_face(face_model):
    """V x 3 vertices of the face model at zero shape, expression and pose."""
    buffer = next(iter(face_model.buffers()))
    codes = FaceCodes.zeros(1, n_shape=face_model.n_shape, n_exp=face_model.n_exp,
                            device=buffer.device)
    with torch.no_grad():
        return face_model(codes).vertices[0]


def normalized_coordinates(vertices):
    """V x 3 positions scaled to [0, 1] per axis (the NMFC colors)."""
    low, high = vertices.amin(0), vertices.amax(0)
    return (vertices - low) / (high - low).clamp_min(1e-12)


class GuidanceRenderer(nn.Module):
    """``GuidanceRenderer(face_model, image_size, guidance)(source_codes, driving_codes)``
    -> :class:`GuidanceMaps`.

    Args:
        face_model: the 3DMM decoder (``flame.FLAME``).
        image_size: render size, int or (H, W) (the generator's input size).
        guidance: one of ``GUIDANCE_KINDS``.
        code_dim: d, the neural code dimension (16 in the paper and the authors' code).
        code_init_std: the codes start as N(0, code_init_std^2) per entry.
        renderer: a ``Renderer`` over the face model's faces (built with culling when None).

    ``encoder_channels``, ``decoder_channels`` and ``displacement_channels`` size the generator.
    """

    def __init__(self, face_model, image_size=64, guidance="geom_disp", code_dim=16,
                 code_init_std=1.0, renderer=None):
        super().__init__()
        if guidance not in GUIDANCE_KINDS:
            raise ValueError(f"unknown guidance {guidance!r}; expected one of {GUIDANCE_KINDS}")
        self.face_model = face_model
        self.guidance = guidance
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.renderer = renderer if renderer is not None else Renderer(face_model.faces, image_size,
                                                                       cull_backfaces=True)
        mean = mean_face(face_model)
        self.vertex_codes = None                                      # E = {e_1 .. e_N}
        if guidance in ("neural_codes", "both"):
            self.vertex_codes = nn.Parameter(torch.randn(mean.shape[0], code_dim) * code_init_std)
        nmfc = normalized_coordinates(mean) if guidance == "nmfc" else None
        self.register_buffer("nmfc_colors", nmfc, persistent=False)

    # ------------------------------------------------------------------ sizes
    @property
    def uses_displacement(self):
        return self.guidance in ("geom_disp", "both")

    @property
    def displacement_channels(self):
        return DISPLACEMENT_CHANNELS if self.uses_displacement else 0

    @property
    def _surface_channels(self):
        """Channels of the per-vertex attribute rendered on both meshes (codes or NMFC)."""
        if self.guidance == "nmfc":
            return NMFC_CHANNELS
        return self.vertex_codes.shape[1] if self.vertex_codes is not None else 0

    @property
    def encoder_channels(self):
        return self._surface_channels

    @property
    def decoder_channels(self):
        return self.displacement_channels + self._surface_channels

    # ------------------------------------------------------------------ rendering
    def posed(self, codes):
        """(vertices B x V x 3, projected B x V x 2) of the codes' mesh."""
        vertices = self.face_model(codes).vertices
        return vertices, weak_perspective(vertices, codes.cam)

    def render(self, vertices, cam, attributes):
        """Per-vertex ``attributes`` (B x V x D) rasterized -> (B x D x H x W, mask B x 1 x H x W)."""
        fragments = self.renderer.rasterize(screen_vertices(vertices, cam), self.image_size)
        return self.renderer.interpolate(fragments, attributes), fragments.mask

    def surface_attributes(self, batch_size):
        """B x V x D: the neural codes or NMFC colors, None for ``geom_disp``."""
        values = self.nmfc_colors if self.guidance == "nmfc" else self.vertex_codes
        if values is None:
            return None
        return values[None].expand(batch_size, -1, -1)

    def geometric_displacement(self, source_codes, driving_codes):
        """D (B x 2 x H x W) of ``P(M_S) - P(M_D)`` on the driving mesh, and its mask."""
        _, projected_source = self.posed(source_codes)
        driving_vertices, projected_driving = self.posed(driving_codes)
        return self.render(driving_vertices, driving_codes.cam,
                           projected_source - projected_driving)

    def surface_maps(self, codes):
        """The codes' mesh rendered with the neural codes (or NMFC colors), and its mask."""
        vertices, _ = self.posed(codes)
        return self.render(vertices, codes.cam, self.surface_attributes(vertices.shape[0]))

    # float32 under autocast (modules/precision.py): 3DMM vertices, projection, rasterization
    @full_precision
    def encoder_input(self, source_codes):
        """The source-rendered codes (or NMFC) the generator's encoder takes with the source image,
        or None for ``geom_disp``; it depends on the source alone (cached at inference)."""
        if self.encoder_channels == 0:
            return None
        return self.surface_maps(source_codes)[0]

    # float32 under autocast (modules/precision.py): 3DMM vertices, projection, rasterization
    @full_precision
    def forward(self, source_codes: FaceCodes, driving_codes: FaceCodes, render_source=True):
        """The maps of a source/driving pair; ``render_source=False`` skips the encoder input
        (``encoder_input`` is then None: the caller has it from :meth:`encoder_input`)."""
        source_vertices, projected_source = self.posed(source_codes)
        driving_vertices, projected_driving = self.posed(driving_codes)
        surface = self.surface_attributes(driving_vertices.shape[0])
        driving_attributes = []
        if self.uses_displacement:
            driving_attributes.append(projected_source - projected_driving)     # V_i, sec. 3.2
        if surface is not None:
            surface = surface.to(driving_vertices.dtype)
            driving_attributes.append(surface)
        guidance, mask = self.render(driving_vertices, driving_codes.cam,
                                     torch.cat(driving_attributes, dim=-1))    # one rasterization
        encoder_input = None
        if surface is not None and render_source:
            encoder_input = self.render(source_vertices, source_codes.cam, surface)[0]
        return GuidanceMaps(encoder_input, guidance, mask)


__all__ = ["GUIDANCE_KINDS", "GuidanceMaps", "GuidanceRenderer", "with_source_shape", "mean_face",
           "normalized_coordinates"]
