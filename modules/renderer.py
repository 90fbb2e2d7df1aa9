"""Weak-perspective mesh rendering of per-vertex attributes with PyTorch3D (SAFA eq. 2).

Camera (SAFA / DECA, orthographic): ``c = (s, tx, ty)``. A model point (X, Y, Z) (metres, +Y up,
+Z towards the camera) lands at the normalized image point

    x = s * (X + tx)          y = -s * (Y + ty)

in the project's coordinates (``modules.coords``: [-1, 1], x right, y DOWN, align_corners=True so
-1 / +1 are the centres of the first / last pixel). The minus sign makes +Y point up in the image:
a positive ``ty`` moves the face up. Depth for visibility is ``s * Z`` (larger = closer).

Rasterization uses PyTorch3D's ``rasterize_meshes``, whose NDC differs from ours: +X points left,
+Y up, and pixel j of an S-pixel axis has its centre at ``1 - (2 j + 1) / S`` (half-pixel
convention) instead of our ``2 j / (S - 1) - 1``. The image is cut into square tiles of ``tile``
pixels, and each tile is rasterized as its own small PyTorch3D image holding only the faces whose
bounding box meets it; a point at our pixel position p (p = (x + 1) (S - 1) / 2) in a tile
starting at pixel t0 gets the tile NDC ``1 - (2 (p - t0) + 1) / tile``, so pixel centres coincide
exactly, for x and for y; depth goes to ``z_ndc = max(s Z) - s Z + 1`` (nearer = smaller, > 0).
Why tiles: PyTorch3D's naive rasterizer tests every face of a mesh at every pixel of it, so small
meshes (tiles) holding few faces each are cheap, and faces that cover no pixel centre at all (most
faces at 64 x 64) are dropped beforehand. All tiles of all images of a call go to PyTorch3D at
once (one call, no per-image loop that would read counts back from the GPU). The result is the
same as one full-image call per image; on the GPU the same path runs unchanged.

Back faces (facing away from the camera, i.e. clockwise on screen seen with y up) are dropped
before rasterization when ``cull_backfaces`` is on.

Gradients: PyTorch3D only decides which face each pixel sees; it rasterizes detached vertices.
The barycentric coordinates of each covered pixel centre are then recomputed from the (attached)
screen vertices with a few vectorized torch ops (ratios of signed triangle areas, the formula
PyTorch3D evaluates, in pixel units instead of tile NDC: barycentrics do not change under that
affine map), so autograd gives the same vertex gradients as PyTorch3D's rasterizer backward without
its per-pixel loop (on 2 CPU threads that backward took about 1.3 s per 256 x 256 image;
``benchmarks/face_maps_speed.py`` compares the two). The face index per pixel is piecewise
constant in the vertices, so its gradient is zero either way.
Everything stays differentiable with respect to the vertices and the attributes.
"""
import math
from typing import NamedTuple

import torch
from torch import nn
from pytorch3d.renderer.mesh.rasterize_meshes import rasterize_meshes

from modules.precision import full_precision


# PyTorch3D keeps a pixel only if its centre is strictly inside a face; a centre exactly on an edge
# shared by two faces would then belong to neither (a pinhole). A tiny blur radius (a squared NDC
# distance) keeps such pixels.
EDGE_EPSILON = 1e-10


def weak_perspective(points, cam):
    """B x N x 3 model points, B x 3 camera (s, tx, ty) -> B x N x 2 normalized image points."""
    scale, trans = cam[:, None, :1], cam[:, None, 1:3]
    xy = scale * (points[..., :2] + trans)
    return torch.stack([xy[..., 0], -xy[..., 1]], dim=-1)


def _pixel_positions(screen, height, width):
    """B x V x 2 pixel positions (x, y) of normalized screen points: pixel centres are integers."""
    return (screen[..., :2] + 1) * 0.5 * screen.new_tensor([width - 1, height - 1])


def _edge(p, a, b):
    """Twice the signed area of the triangle (a, b, p), for ... x 2 points (PyTorch3D's edge
    function: which side of the edge a -> b the point p lies on)."""
    return (p[..., 0] - a[..., 0]) * (b[..., 1] - a[..., 1]) \
        - (p[..., 1] - a[..., 1]) * (b[..., 0] - a[..., 0])


def screen_vertices(points, cam):
    """B x N x 3: normalized image x, y and depth s * Z (larger is closer to the camera)."""
    return torch.cat([weak_perspective(points, cam), cam[:, None, :1] * points[..., 2:3]], dim=-1)


def face_normals(vertices, faces):
    """Unnormalized (area-weighted) normals B x F x 3 of faces F x 3 (counter-clockwise = outward)."""
    v0, v1, v2 = (vertices[:, faces[:, k]] for k in range(3))
    return torch.cross(v1 - v0, v2 - v0, dim=-1)


def vertex_normals(vertices, faces, eps=1e-12):
    """Unit vertex normals B x V x 3: area-weighted mean of the normals of the neighbouring faces."""
    fn = face_normals(vertices, faces)
    normals = torch.zeros_like(vertices)
    for k in range(3):
        normals = normals.index_add(1, faces[:, k], fn)
    return normals / normals.norm(dim=-1, keepdim=True).clamp_min(eps)


class Fragments(NamedTuple):
    pix_to_face: torch.Tensor   # B x H x W long, face index (-1: background)
    bary: torch.Tensor          # B x H x W x 3, barycentric coordinates (differentiable)
    mask: torch.Tensor          # B x 1 x H x W float, 1 where a face is visible


class _PackedFaces:
    """The four things ``rasterize_meshes`` reads from a ``Meshes``, for meshes given directly as
    face corner coordinates (one small mesh per image tile; building a ``Meshes`` of hundreds of
    tiles would cost more than rasterizing them)."""

    def __init__(self, corners, counts):
        self._corners = corners.reshape(-1, 3)                       # (3 P) x 3
        self._counts = counts
        self.device = corners.device

    def verts_packed(self):
        return self._corners

    def faces_packed(self):
        return torch.arange(self._corners.shape[0], device=self.device).view(-1, 3)

    def num_faces_per_mesh(self):
        return self._counts

    def mesh_to_faces_packed_first_idx(self):
        return torch.cumsum(self._counts, 0) - self._counts

    def __len__(self):
        return self._counts.shape[0]


class Renderer(nn.Module):
    """Rasterize a batched mesh with a weak-perspective camera and interpolate attributes.

    ``faces`` (F x 3, counter-clockwise seen from outside) is fixed; vertices, camera and
    attributes come per call. Any image size (int or (H, W)); any attribute dimension.
    """

    def __init__(self, faces, image_size=64, cull_backfaces=True, tile=None):
        super().__init__()
        self.register_buffer("faces", torch.as_tensor(faces, dtype=torch.int64), persistent=False)
        self.image_size = image_size
        self.cull_backfaces = cull_backfaces
        self.tile = tile

    def _size(self, image_size):
        size = self.image_size if image_size is None else image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def _tile(self, height, width):
        """Tile side in pixels: 16 measured fastest on CPU from 64 to 256 pixels (smaller tiles
        repeat more faces across tiles, bigger ones test more faces per pixel)."""
        if self.tile:
            return self.tile
        return min(16, max(height, width))

    # ------------------------------------------------------------------ rasterization
    def visible_faces(self, screen):
        """B x F bool: faces worth rasterizing (front-facing if culling, overlapping the image)."""
        tri = screen[:, self.faces]                                        # B x F x 3 x 3
        keep = (tri[..., :2].amax(2) >= -1.0).all(-1) & (tri[..., :2].amin(2) <= 1.0).all(-1)
        if self.cull_backfaces:
            e1, e2 = tri[:, :, 1, :2] - tri[:, :, 0, :2], tri[:, :, 2, :2] - tri[:, :, 0, :2]
            # signed area with y flipped back to "up": > 0 means counter-clockwise = facing us
            area = -(e1[..., 0] * e2[..., 1] - e1[..., 1] * e2[..., 0])
            keep &= area > 0
        return keep

    # Not compiled (torch.compile runs it eagerly): the face per pixel comes from PyTorch3D's C++
    # rasterizer, and the covered pixels' count, which sets the shapes below, from the data.
    @torch.compiler.disable
    @full_precision   # PyTorch3D's rasterizer takes float32; vertices need it anyway
    def rasterize(self, screen, image_size=None):
        """screen: B x V x 3 (x, y normalized, depth larger = closer) -> :class:`Fragments`.

        The face seen at each pixel comes from PyTorch3D on detached vertices; the barycentric
        coordinates are recomputed from ``screen`` so that they carry its gradient."""
        height, width = self._size(image_size)
        with torch.no_grad():
            face, _ = self._pixel_faces(screen.detach(), height, width)
        mask = (face >= 0).to(screen.dtype)[:, None]
        return Fragments(face, self.barycentrics(screen, face), mask)

    def _rasterize_with_pytorch3d_gradients(self, screen, image_size=None):
        """The same fragments with PyTorch3D's own barycentrics and backward (its per-pixel C++
        loop). Kept only as the reference for the parity tests and the speed benchmark."""
        face, bary = self._pixel_faces(screen, *self._size(image_size))
        return Fragments(face, bary, (face >= 0).to(screen.dtype)[:, None])

    def barycentrics(self, screen, face):
        """B x H x W x 3 barycentric coordinates of each pixel centre in the face it sees (0 on
        the background), differentiable w.r.t. ``screen`` (B x V x 3).

        w_k = (signed area of the triangle with corner k replaced by the pixel) / (face area),
        PyTorch3D's formula, evaluated in pixel units; only covered pixels are computed."""
        batch, height, width = face.shape
        flat = face.reshape(-1)
        covered = (flat >= 0).nonzero(as_tuple=True)[0]                   # P covered pixels
        b_idx = covered // (height * width)
        p_y, p_x = (covered % (height * width)) // width, covered % width
        pix = _pixel_positions(screen, height, width)
        point = torch.stack([p_x, p_y], -1).to(pix.dtype)
        # corners relative to the pixel centre: small numbers, so the products below keep the
        # precision of the vertex positions even far from the image origin
        corners = pix[b_idx[:, None], self.faces[flat[covered]]] - point[:, None]  # P x 3 x 2
        v0, v1, v2 = corners.unbind(1)
        centre = torch.zeros_like(point)
        area = _edge(v2, v0, v1)
        bary = torch.stack([_edge(centre, v1, v2), _edge(centre, v2, v0), _edge(centre, v0, v1)],
                           -1) / area[:, None]
        out = screen.new_zeros(batch * height * width, 3).index_put((covered,), bary)
        return out.view(batch, height, width, 3)

    def _pixel_faces(self, screen, height, width):
        """Face index per pixel (B x H x W, -1: background) and PyTorch3D's barycentrics, tile by
        tile (see the module docstring)."""
        tile = self._tile(height, width)
        ny, nx = math.ceil(height / tile), math.ceil(width / tile)
        batch = screen.shape[0]
        # pixel positions (x, y) and a positive depth where nearer is smaller
        pix = _pixel_positions(screen, height, width)
        depth = screen[..., 2]
        z = depth.detach().amax(1, keepdim=True) - depth + 1.0
        b_idx, f_idx = self.visible_faces(screen.detach()).nonzero(as_tuple=True)
        corners_pix = pix[b_idx[:, None], self.faces[f_idx]]               # K x 3 x 2
        # tiles met by each face's bounding box (pixel centres lie on integer positions)
        lo = torch.ceil(corners_pix.detach().amin(1)).long()
        hi = torch.floor(corners_pix.detach().amax(1)).long()
        # PyTorch3D's CPU rasterizer pays a few microseconds per face it is given, and at low
        # resolution most faces are smaller than a pixel: drop the faces that cover no pixel centre
        covers = self._covers_a_pixel_centre(corners_pix.detach(), lo, hi)
        b_idx, f_idx, corners_pix = b_idx[covers], f_idx[covers], corners_pix[covers]
        lo, hi = lo[covers], hi[covers]
        tx, ty = torch.arange(nx, device=screen.device), torch.arange(ny, device=screen.device)
        meets_x = (lo[:, None, 0] <= tx * tile + tile - 1) & (hi[:, None, 0] >= tx * tile)   # K x nx
        meets_y = (lo[:, None, 1] <= ty * tile + tile - 1) & (hi[:, None, 1] >= ty * tile)   # K x ny
        pair, tile_y, tile_x = (meets_y[:, :, None] & meets_x[:, None, :]).nonzero(as_tuple=True)
        if pair.numel() == 0:                                              # nothing in view
            return self._empty(screen, height, width)
        mesh = (b_idx[pair] * ny + tile_y) * nx + tile_x                  # one small mesh per tile
        order = torch.argsort(mesh, stable=True)
        pair, mesh, tile_x, tile_y = pair[order], mesh[order], tile_x[order], tile_y[order]
        origin = torch.stack([tile_x, tile_y], -1)[:, None].to(pix.dtype) * tile
        local = 1 - (2 * (corners_pix[pair] - origin) + 1) / tile           # tile NDC
        corners = torch.cat([local, z[b_idx[pair][:, None], self.faces[f_idx[pair]]][..., None]], -1)
        counts = torch.bincount(mesh, minlength=batch * ny * nx).view(batch, ny * nx)
        p2f, bary = self._rasterize_tiles(corners, counts, tile)
        p2f, bary = self._untile(p2f, batch, ny, nx), self._untile(bary, batch, ny, nx)
        p2f, bary = p2f[:, :height, :width], bary[:, :height, :width]
        face = torch.where(p2f >= 0, f_idx[pair][p2f.clamp_min(0)], torch.full_like(p2f, -1))
        return face, bary

    @staticmethod
    def _covers_a_pixel_centre(corners, lo, hi, tol=1e-4):
        """K bool: the face may cover a pixel centre. Exact for faces whose bounding box holds at
        most 2 x 2 centres (tested point by point), conservative (True) for bigger ones."""
        holds = (lo <= hi).all(-1)
        small = ((hi - lo) <= 1).all(-1)
        offsets = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]], device=lo.device)
        points = (lo[:, None] + offsets).to(corners.dtype)                  # K x 4 x 2
        valid = ((lo[:, None] + offsets) <= hi[:, None]).all(-1)
        v0, v1, v2 = corners[:, None, 0], corners[:, None, 1], corners[:, None, 2]
        cross = lambda a, b, p: (b[..., 0] - a[..., 0]) * (p[..., 1] - a[..., 1]) \
            - (b[..., 1] - a[..., 1]) * (p[..., 0] - a[..., 0])  # noqa: E731
        area = cross(v0, v1, v2)                                            # K x 1, either sign
        scale = area.abs().clamp_min(1e-12)
        inside = ((cross(v0, v1, points) * area.sign() >= -tol * scale)
                  & (cross(v1, v2, points) * area.sign() >= -tol * scale)
                  & (cross(v2, v0, points) * area.sign() >= -tol * scale))
        return holds & (~small | (inside & valid).any(1))

    @staticmethod
    def _rasterize_tiles(corners, counts, tile):
        """Every tile of every image in one PyTorch3D call (each tile a mesh of its faces; the
        cost is the sum over tiles of pixels x faces, the same as one call per image, without a
        host sync per image on the GPU). Returns (B ny nx) x t x t pix_to_face, indexing
        ``corners``, and barycentrics."""
        p2f, _, bary, _ = rasterize_meshes(
            _PackedFaces(corners, counts.reshape(-1)), image_size=tile, blur_radius=EDGE_EPSILON,
            faces_per_pixel=1, bin_size=0, max_faces_per_bin=1, perspective_correct=False,
            cull_backfaces=False)
        return p2f[..., 0], bary[..., 0, :]

    @staticmethod
    def _empty(screen, height, width):
        batch = screen.shape[0]
        face = torch.full((batch, height, width), -1, dtype=torch.long, device=screen.device)
        bary = screen.new_zeros(batch, height, width, 3) + 0 * screen.sum()   # keeps the graph
        return face, bary

    @staticmethod
    def _untile(x, batch, ny, nx):
        """(B ny nx) x t x t x ... -> B x (ny t) x (nx t) x ..."""
        t = x.shape[1]
        x = x.reshape(batch, ny, nx, t, t, *x.shape[3:])
        x = x.transpose(2, 3)                                              # B, ny, t, nx, t, ...
        return x.reshape(batch, ny * t, nx * t, *x.shape[5:])

    # ------------------------------------------------------------------ attributes
    def interpolate(self, fragments, vertex_attributes=None, face_attributes=None):
        """Barycentric interpolation -> B x D x H x W (0 on the background).

        vertex_attributes: B x V x D; face_attributes: B x F x 3 x D or F x 3 x D (per corner,
        e.g. UVs across a seam). Given both, the outputs are concatenated (vertex ones first).
        """
        face = fragments.pix_to_face.clamp_min(0)                          # B x H x W
        batch = face.shape[0]
        b = torch.arange(batch, device=face.device)[:, None, None]
        outputs = []
        if vertex_attributes is not None:
            corners = self.faces[face]                                     # B x H x W x 3
            outputs.append(vertex_attributes[b[..., None], corners])       # B x H x W x 3 x D
        if face_attributes is not None:
            outputs.append(face_attributes[face] if face_attributes.dim() == 3
                           else face_attributes[b, face])
        values = torch.cat(outputs, dim=-1)
        image = (fragments.bary[..., None] * values).sum(-2) * fragments.mask[:, 0, ..., None]
        return image.permute(0, 3, 1, 2)

    def forward(self, vertices, cam, vertex_attributes=None, face_attributes=None, image_size=None):
        """R(M, c, A): returns dict(image B x D x H x W, mask B x 1 x H x W, fragments)."""
        fragments = self.rasterize(screen_vertices(vertices, cam), image_size)
        out = {"mask": fragments.mask, "fragments": fragments}
        if vertex_attributes is not None or face_attributes is not None:
            out["image"] = self.interpolate(fragments, vertex_attributes, face_attributes)
        return out
