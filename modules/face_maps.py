"""SAFA's 3D face maps (paper section 4.1, eqs. 3-8 and 11; appendix B eqs. 22-24).

Given a source image S with its 3DMM codes Phi_S and the driving codes Phi_D:

* A_{S,tex} = S(Proj(M(alpha_S, beta_S, theta_S), c_S))   per-vertex source colors, eq. 3
  (bilinear sampling at the projected vertices, occluded ones included, as in the paper)
* A_{S,n}, A_{D,n}   vertex normals from the neighbouring faces
* A_m = Proj(M_S, c_S) - Proj(M_D, c_D)                    per-vertex motion, eq. 4
* I_r = R(M_D, c_D, A_{S,tex})                             3D reenactment, eq. 5
* I_{n,S} = R(M_S, c_S, A_{S,n})                           source normal map, eq. 6
* I_{n,D} = R(M(alpha_S, beta_D, theta_D), c_D, A_{D,n})   driving normal map, eq. 7 (source shape,
  as the paper writes it; ``driving_normal_shape='driving'`` uses alpha_D instead)
* T_{S<-D,3D} = R(M_D, c_D, A_m) as a backward flow        eq. 8
* H_3D = I_{n,D}^z - I_{n,S}^z                             the 3D slot's heatmap, eq. 11

Every map is kept only on the face region: the UV face mask (eyes and mouth excluded) sampled at
the rendered UV coordinates, times visibility. Normals are in camera space (x right, y up, z
towards the camera; weak perspective does not rotate). The flow is in the project's normalized
coordinates (``modules.coords``): for each driving pixel z, ``flow_3d(z) = z + A_m(z)``, i.e. the
source location of the surface point seen at z, inside the face mask, and ``z`` (identity)
outside it. All outputs are differentiable w.r.t. the codes and the source image.
"""
import torch
import torch.nn.functional as F
from torch import nn

from flame.codes import FaceCodes, relative_codes
from modules.coords import ALIGN_CORNERS, make_coordinate_grid
from modules.precision import full_precision
from modules.renderer import Fragments, Renderer, screen_vertices, vertex_normals, weak_perspective


def sample_at_points(image, points):
    """Bilinear colors B x N x C of ``image`` (B x C x H x W) at normalized points B x N x 2."""
    sampled = F.grid_sample(image, points[:, :, None, :].to(image.dtype), mode="bilinear",
                            padding_mode="border", align_corners=ALIGN_CORNERS)
    return sampled[..., 0].permute(0, 2, 1)


def render_face_region(renderer, vertices, cam, attributes, face_uvs=None, uv_face_mask=None,
                       image_size=None, threshold=0.5):
    """Rasterize a posed mesh once and interpolate per-vertex ``attributes`` (B x V x D).

    Returns (maps B x D x H x W, face-region mask B x 1 x H x W in {0, 1}, fragments). The face
    region is the UV face mask (``uv_face_mask``, 1 x 1 x h x w, sampled at the rendered UV
    coordinates ``face_uvs``, F x 3 x 2) times visibility, thresholded; without UVs or without a
    mask it is the whole visible mesh.
    """
    fragments = renderer.rasterize(screen_vertices(vertices, cam), image_size)
    maps, mask = face_region_maps(renderer, fragments, attributes, face_uvs, uv_face_mask,
                                  threshold)
    return maps, mask, fragments


def face_region_maps(renderer, fragments, attributes, face_uvs=None, uv_face_mask=None,
                     threshold=0.5):
    """The attribute maps and face-region mask of :func:`render_face_region` from fragments
    rasterized already."""
    if face_uvs is None or uv_face_mask is None:
        return renderer.interpolate(fragments, attributes), fragments.mask
    maps = renderer.interpolate(fragments, attributes, face_uvs)
    uv = maps[:, -2:].permute(0, 2, 3, 1)
    mask = F.grid_sample(uv_face_mask.expand(uv.shape[0], -1, -1, -1).to(uv.dtype), uv,
                         mode="bilinear", padding_mode="zeros", align_corners=False)
    mask = (mask * fragments.mask > threshold).to(maps.dtype)
    return maps[:, :-2], mask


class FaceMaps(nn.Module):
    """``FaceMaps(flame, image_size)(source_image, source_codes, driving_codes) -> dict``.

    Output keys (B = batch, H x W = ``image_size``):
      I_r                B x 3 x H x W   source texture on the driving face, masked (eq. 5)
      I_s                B x 3 x H x W   source texture on the source face, masked (the
                                         authors' photometric term compares it with the source)
      normal_source      B x 3 x H x W   I_{n,S}, masked by the source face mask (eq. 6)
      normal_driving     B x 3 x H x W   I_{n,D}, masked by the driving face mask (eq. 7)
      heatmap_3d         B x 1 x H x W   normal_driving.z - normal_source.z (eq. 11)
      flow_3d            B x H x W x 2   T_{S<-D,3D}, backward flow (eq. 8)
      face_mask_driving  B x 1 x H x W   {0, 1}
      face_mask_source   B x 1 x H x W   {0, 1}
      vertices_source / vertices_driving  B x V x 3
      landmarks_source / landmarks_driving  B x 68 x 2 (normalized image coordinates)
    """

    def __init__(self, flame, image_size=64, renderer=None, driving_normal_shape="source",
                 mask_threshold=0.5):
        super().__init__()
        if driving_normal_shape not in ("source", "driving"):
            raise ValueError("driving_normal_shape must be 'source' (paper eq. 7) or 'driving'")
        self.flame = flame
        self.renderer = renderer if renderer is not None else Renderer(flame.faces, image_size)
        self.image_size = image_size
        self.driving_normal_shape = driving_normal_shape
        self.mask_threshold = mask_threshold
        face_uvs = flame.face_uvs()
        self.register_buffer("face_uvs", face_uvs, persistent=False)
        mask = flame.uv_face_mask if face_uvs is not None else None
        self.register_buffer("uv_face_mask", mask, persistent=False)

    def _size(self):
        size = self.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def render(self, vertices, cam, attributes):
        """Rasterize once; returns (attribute maps B x D x H x W, face mask B x 1 x H x W)."""
        return self.render_meshes([(vertices, cam, attributes)])[0]

    def render_meshes(self, meshes):
        """``[(vertices B x V x 3, cam B x 3, attributes B x V x D), ...]`` rasterized together in
        one call (the meshes stacked along the batch), then each mesh's attributes interpolated:
        ``[(maps B x D x H x W, face mask B x 1 x H x W), ...]``."""
        screen = torch.cat([screen_vertices(vertices, cam) for vertices, cam, _ in meshes])
        fragments = self.renderer.rasterize(screen, self._size())
        batch, results = meshes[0][0].shape[0], []
        for index, (_, _, attributes) in enumerate(meshes):
            part = Fragments(*(field[index * batch:(index + 1) * batch] for field in fragments))
            results.append(face_region_maps(self.renderer, part, attributes, self.face_uvs,
                                            self.uv_face_mask, self.mask_threshold))
        return results

    # Float32 under autocast (modules/precision.py): FLAME (blend shapes, skinning: matrix
    # products), the projection, rasterization and the barycentric interpolation of coordinates.
    # A 16-bit vertex is off by ~1/256 of its size: a pixel at 256 px, and T_3D is a flow.
    @full_precision
    def forward(self, source_image, source_codes: FaceCodes, driving_codes: FaceCodes,
                driving_reference: FaceCodes = None):
        """With ``driving_reference`` the driving motion is applied relatively (appendix B:
        Phi_{S_t} from eq. 22, then eqs. 23-24)."""
        if driving_reference is not None:
            driving_codes = relative_codes(source_codes, driving_codes, driving_reference)
        src, drv = self.flame(source_codes), self.flame(driving_codes)
        proj_s = weak_perspective(src.vertices, source_codes.cam)          # Proj(M_S, c_S)
        proj_d = weak_perspective(drv.vertices, driving_codes.cam)         # Proj(M_D, c_D)
        tex_s = sample_at_points(source_image, proj_s)                      # A_{S,tex}, eq. 3
        motion = proj_s - proj_d                                            # A_m, eq. 4
        normals_s = vertex_normals(src.vertices, self.flame.faces)          # A_{S,n}
        if self.driving_normal_shape == "source":                   # M(alpha_S, beta_D, theta_D)
            verts_n = self.flame(driving_codes.replace(shape=source_codes.shape)).vertices
        else:
            verts_n = drv.vertices
        normals_d = vertex_normals(verts_n, self.flame.faces)               # A_{D,n}

        same_mesh = self.driving_normal_shape == "driving"              # one mesh less
        driving_attributes = [tex_s, motion] + ([normals_d] if same_mesh else [])
        # every mesh of the pair in one rasterization (PyTorch3D's set-up and, on the GPU, the
        # host syncs of the renderer's face selection are paid once)
        meshes = [(drv.vertices, driving_codes.cam, torch.cat(driving_attributes, -1)),
                  (src.vertices, source_codes.cam, torch.cat([normals_s, tex_s], -1))]
        if not same_mesh:
            meshes.append((verts_n, driving_codes.cam, normals_d))
        rendered = self.render_meshes(meshes)
        (maps_d, mask_d), (maps_s, mask_s) = rendered[:2]
        normal_s, rendered_source = maps_s[:, :3], maps_s[:, 3:6]
        if same_mesh:
            normal_d, mask_nd = maps_d[:, 5:8], mask_d
        else:
            normal_d, mask_nd = rendered[2]
        rendered_tex, rendered_motion = maps_d[:, :3], maps_d[:, 3:5]
        height, width = self._size()
        grid = make_coordinate_grid(height, width, dtype=motion.dtype, device=motion.device)
        flow = grid[None] + (rendered_motion * mask_d).permute(0, 2, 3, 1)  # T_{S<-D,3D}, eq. 8
        normal_s, normal_d = normal_s * mask_s, normal_d * mask_nd
        return {
            "I_r": rendered_tex * mask_d,                                   # eq. 5
            "I_s": rendered_source * mask_s,         # source texture on the source mesh
            "normal_source": normal_s,                                      # I_{n,S}, eq. 6
            "normal_driving": normal_d,                                     # I_{n,D}, eq. 7
            "heatmap_3d": normal_d[:, 2:3] - normal_s[:, 2:3],              # H_3D, eq. 11
            "flow_3d": flow,
            "face_mask_driving": mask_d,
            "face_mask_source": mask_s,
            "vertices_source": src.vertices,
            "vertices_driving": drv.vertices,
            "landmarks_source": weak_perspective(src.landmarks, source_codes.cam),
            "landmarks_driving": weak_perspective(drv.landmarks, driving_codes.cam),
        }
