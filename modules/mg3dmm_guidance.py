"""The multiple guidance of seed 003 (section "Extraction of Multiple Guidance"), from 3DMM codes.

Given the source codes v_s and the driving codes v_d, the target codes are
v_t = (alpha_s, beta_d, delta_s, gamma_s, p_d) (``modules.shading.reenactment_codes``) and:

* F_c, the computed optical flow of the inner face (eq. 3):
  ``F_c = R(V_t, P(V_s), C) - G(h, w)``: every target vertex carries the image position of the
  same vertex on the source mesh, the target mesh is rasterized with these attributes, and the
  coordinate grid is subtracted. Returned as the project's backward flow (``G + displacement``,
  ``B x H x W x 2``): on the inner face each target pixel holds where its surface point is in the
  source image; outside it the flow is the identity (no computed motion there).
* O_c, the computed occlusion map of the inner face (eq. 4): ``O_c = 1(P_t in P_s)``, a target
  pixel is visible (1) when the surface point it shows is also seen in the source, occluded (0)
  otherwise. The paper states it with triangle sets (the target pixel's triangle must be among
  the triangles visible in the source); at a finite resolution a visible triangle may cover no
  pixel centre of the source, so we ask the same question per surface point with the source's
  z-buffer: the point's source depth (interpolated from the source vertices' depths on the
  target triangle) must not lie behind the source depth map at its source position (more than
  ``depth_tolerance`` pixels), and that position must be covered by the source mesh (a point
  turned away from the camera is culled in the source, so whatever covers its position is in
  front of it, or nothing does). Outside the inner face O_c is 1 (nothing computed is occluded).
* I_r, the rendered image: the target mesh colored with the source albedo and lighting
  (albedo(delta_s) x SH shading(gamma_s) per vertex, ``modules.shading``), where the target mesh
  is visible, 0 elsewhere.

The inner face is the face model's face region: the UV face mask (eyes and mouth excluded) for
FLAME, the whole visible mesh for BFM (whose mesh is the front of the face). Each mesh is
rasterized once: the source mesh for its z-buffer (``source_geometry``, which inference computes
once per source image), the target mesh for F_c, O_c and I_r together.
"""
import torch
from torch import nn

from flame.codes import FaceCodes
from modules.coords import make_coordinate_grid, sample
from modules.face_maps import render_face_region
from modules.precision import full_precision
from modules.renderer import screen_vertices
from modules.shading import ShadedFace, reenactment_codes

DEPTH_TOLERANCE_PIXELS = 1.5


class MultipleGuidance(nn.Module):
    """``MultipleGuidance(face_model, image_size)(target_codes, source_geometry) -> dict``.

    ``face_model``: FLAME with an albedo basis (e.g. ``FLAME.open_head()``) or ``flame.bfm.BFM``.
    ``depth_tolerance``: how far (in pixels of ``image_size``, depth in the same normalized units
    as x) a surface point may lie behind the source z-buffer and still count as visible. The
    z-buffer is read bilinearly between pixel centres, exact on a flat patch but not across the
    mesh's creases, steep slopes and the silhouette; 1.5 pixels absorbs that (our choice).

    Use ``source_geometry(source_codes)`` once per source, ``target_codes(source, driving)`` for
    v_t, then call the module. Output keys (H x W = ``image_size``; all without gradients when
    the codes have none):

      flow         B x H x W x 2  F_c as a backward flow (identity outside the inner face)
      occlusion    B x 1 x H x W  O_c: 1 visible in the source, 0 occluded (1 outside the face)
      rendered     B x 3 x H x W  I_r, target mesh in the source's albedo and light
      shading      B x 3 x H x W  the SH irradiance part of I_r (I_r = albedo x shading)
      face_mask    B x 1 x H x W  {0, 1}, the target's inner face region
      mask         B x 1 x H x W  {0, 1}, the visible target mesh
    """

    def __init__(self, face_model, image_size=64, depth_tolerance=DEPTH_TOLERANCE_PIXELS,
                 mask_threshold=0.5):
        super().__init__()
        self.shaded = ShadedFace(face_model, image_size, mask_threshold=mask_threshold)
        self.depth_tolerance = depth_tolerance

    @property
    def face_model(self):
        return self.shaded.face_model

    @property
    def renderer(self):
        return self.shaded.renderer

    def size(self):
        size = self.shaded.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @staticmethod
    def target_codes(source_codes: FaceCodes, driving_codes: FaceCodes):
        """v_t = (alpha_s, beta_d, delta_s, gamma_s, p_d)."""
        return reenactment_codes(source_codes, driving_codes)

    # float32 under autocast (modules/precision.py): 3DMM vertices, projection, rasterization
    @full_precision
    def source_geometry(self, source_codes: FaceCodes):
        """The source mesh rasterized once: ``{'screen': B x V x 3`` projected vertices P(V_s) and
        their depths, ``'depth': B x 1 x H x W`` z-buffer (larger = nearer), ``'mask'``}."""
        screen = screen_vertices(self.face_model(source_codes).vertices, source_codes.cam)
        fragments = self.renderer.rasterize(screen, self.size())
        depth = self.renderer.interpolate(fragments, screen[..., 2:3])
        return {"screen": screen, "depth": depth, "mask": fragments.mask}

    # float32 under autocast (modules/precision.py): 3DMM vertices, projection, rasterization
    @full_precision
    def forward(self, target_codes: FaceCodes, source_geometry):
        vertices = self.face_model(target_codes).vertices
        color, _, shading = self.shaded.vertex_colors(target_codes, vertices)
        attributes = torch.cat([source_geometry["screen"], color, shading], -1)
        maps, face_mask, fragments = render_face_region(
            self.renderer, vertices, target_codes.cam, attributes, self.shaded.face_uvs,
            self.shaded.uv_face_mask, self.size(), self.shaded.mask_threshold)
        projected, depth = maps[:, 0:2], maps[:, 2:3]          # R(V_t, P(V_s)), source depth
        height, width = self.size()
        grid = make_coordinate_grid(height, width, dtype=maps.dtype, device=maps.device)
        displacement = (projected - grid.permute(2, 0, 1)[None]) * face_mask    # eq. 3
        visible = self.visible_in_source(projected, depth, source_geometry)
        return {"flow": grid[None] + displacement.permute(0, 2, 3, 1),
                "occlusion": face_mask * visible + (1 - face_mask),             # eq. 4
                "rendered": maps[:, 3:6], "shading": maps[:, 6:9],
                "face_mask": face_mask, "mask": fragments.mask}

    def visible_in_source(self, points, depth, source_geometry):
        """B x 1 x H x W in {0, 1}: the surface points at ``points`` (their source positions,
        B x 2 x H x W) with source depths ``depth`` pass the source z-buffer test.

        The z-buffer is read bilinearly over covered pixels only (the depth-weighted average of
        the covered neighbours), so the silhouette does not mix in the background."""
        grid = points.permute(0, 2, 3, 1)
        cover = sample(source_geometry["mask"], grid)
        buffer = sample(source_geometry["depth"] * source_geometry["mask"], grid) \
            / cover.clamp_min(1e-6)
        pixel = 2.0 / (self.size()[1] - 1)                   # depth is in units of x
        in_front = depth >= buffer - self.depth_tolerance * pixel
        return ((cover > 0.5) & in_front).to(depth.dtype)


__all__ = ["MultipleGuidance", "DEPTH_TOLERANCE_PIXELS"]
