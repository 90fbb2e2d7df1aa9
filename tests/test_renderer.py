"""Weak-perspective renderer (PyTorch3D) conventions and SAFA's 3D face maps."""
import numpy as np
import pytest
import torch

from flame import FLAME, FaceCodes, ensure_open_head
from modules.coords import make_coordinate_grid, normalized_to_pixels, pixels_to_normalized, warp
from modules.face_maps import FaceMaps
from modules.renderer import Renderer, vertex_normals, weak_perspective

IDENTITY_CAM = torch.tensor([[1.0, 0.0, 0.0]])


def image_points_to_model(points_xy, depth=0.0):
    """Model points that land on normalized image points under the identity camera (y flips)."""
    z = torch.full_like(points_xy[..., :1], depth)
    return torch.cat([points_xy[..., :1], -points_xy[..., 1:2], z], -1)


@pytest.fixture(scope="module")
def flame():
    return FLAME.from_assets(ensure_open_head(), n_shape=100, n_exp=50)


# ----------------------------------------------------------------------------- renderer
def test_weak_perspective_convention():
    point = torch.tensor([[[0.1, 0.2, 0.3]]])
    cam = torch.tensor([[2.0, 0.05, -0.1]])
    np.testing.assert_allclose(weak_perspective(point, cam)[0, 0].numpy(), [0.3, -0.2], atol=1e-6)


@pytest.mark.parametrize("size", [(8, 8), (6, 10), (10, 6), (40, 40)])
@pytest.mark.parametrize("tile", [4, 16])
def test_triangle_covers_expected_pixels(size, tile):
    height, width = size
    corners_px = torch.tensor([[1.5, 1.5], [1.5, 5.2], [4.7, 1.5]])       # (x, y) pixel positions
    verts = image_points_to_model(pixels_to_normalized(corners_px, height, width))[None]
    renderer = Renderer(torch.tensor([[0, 1, 2]]), image_size=(height, width), tile=tile)
    mask = renderer(verts, IDENTITY_CAM)["mask"][0, 0]
    expected = torch.zeros(height, width)
    for x, y in [(2, 2), (3, 2), (4, 2), (2, 3), (3, 3), (2, 4)]:           # centres inside
        expected[y, x] = 1
    assert torch.equal(mask, expected)
    # the same triangle wound the other way faces away from the camera: culled
    back = Renderer(torch.tensor([[0, 2, 1]]), image_size=(height, width), tile=tile)
    assert back(verts, IDENTITY_CAM)["mask"].sum() == 0
    no_cull = Renderer(torch.tensor([[0, 2, 1]]), image_size=(height, width), cull_backfaces=False)
    assert torch.equal(no_cull(verts, IDENTITY_CAM)["mask"][0, 0], expected)


@pytest.mark.parametrize("size", [(16, 16), (12, 20), (64, 64)])
def test_interpolated_positions_hit_pixel_centres(size):
    """A quad over the image with its own normalized position as attribute renders exactly the
    align_corners=True coordinate grid: pixel centres agree with modules.coords."""
    height, width = size
    xy = torch.tensor([[-1.5, -1.5], [1.5, -1.5], [1.5, 1.5], [-1.5, 1.5]])
    verts = image_points_to_model(xy)[None]
    faces = torch.tensor([[0, 3, 2], [0, 2, 1]])                           # counter-clockwise, y up
    out = Renderer(faces, image_size=(height, width))(verts, IDENTITY_CAM, vertex_attributes=xy[None])
    assert out["mask"].min() == 1
    grid = make_coordinate_grid(height, width).permute(2, 0, 1)
    assert (out["image"][0] - grid).abs().max() < 1e-5


def test_nearer_surface_wins_and_attributes_of_any_size():
    xy = torch.tensor([[-0.9, -0.9], [0.9, -0.9], [0.0, 0.9]])
    far, near = image_points_to_model(xy, depth=-1.0), image_points_to_model(xy * 0.5, depth=1.0)
    verts = torch.cat([far, near])[None]
    faces = torch.tensor([[0, 2, 1], [3, 5, 4]])                           # counter-clockwise, y up
    attrs = torch.cat([torch.zeros(3, 5), torch.ones(3, 5)])[None]          # a 5-d attribute
    out = Renderer(faces, 16)(verts, IDENTITY_CAM, vertex_attributes=attrs)
    assert out["image"].shape == (1, 5, 16, 16)
    assert torch.all(out["image"][0, :, 7, 7] == 1)                        # the near triangle wins
    assert torch.all(out["image"][0, :, 2, 7] == 0) and out["mask"][0, 0, 2, 7] == 1  # far one only
    assert out["mask"][0, 0, 15, 0] == 0                                    # background corner


def test_rendering_is_differentiable_and_batched(flame):
    codes = FaceCodes.zeros(2, scale=8.0)
    codes.pose[1, 1] = 0.4
    verts = flame(codes).vertices.detach().requires_grad_(True)
    colors = torch.rand(2, flame.num_vertices, 3, requires_grad=True)
    renderer = Renderer(flame.faces, image_size=(24, 32))
    out = renderer(verts, codes.cam, vertex_attributes=colors)
    assert out["image"].shape == (2, 3, 24, 32) and not torch.equal(out["mask"][0], out["mask"][1])
    (out["image"] * torch.rand_like(out["image"])).sum().backward()
    assert verts.grad.abs().sum() > 0 and colors.grad.abs().sum() > 0


class PyTorch3DGradientRenderer(Renderer):
    """The former path: PyTorch3D's barycentrics and their C++ backward (the parity reference)."""
    rasterize = Renderer._rasterize_with_pytorch3d_gradients


def jittered_grid_mesh(n=6, seed=0):
    """A small n x n vertex sheet over the image with random offsets and depths (2 (n-1)^2
    counter-clockwise faces, some overlapping) and two cameras."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1.1, 1.1, n), torch.linspace(-1.1, 1.1, n), indexing="ij")
    xy = torch.stack([xs, ys], -1).reshape(-1, 2) + 0.08 * torch.randn(n * n, 2, generator=generator)
    verts = image_points_to_model(xy)
    verts[:, 2] = 0.2 * torch.randn(n * n, generator=generator)
    faces = [[a, a + n, a + n + 1] for a in range(n * n - n) if a % n < n - 1]
    faces += [[a, a + n + 1, a + 1] for a in range(n * n - n) if a % n < n - 1]
    cam = torch.tensor([[1.0, 0.0, 0.0], [1.1, 0.05, -0.02]])
    return torch.stack([verts, 0.8 * verts]), torch.tensor(faces), cam


def max_relative_difference(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("cull", [True, False])
def test_barycentric_gradients_match_pytorch3d_backward(cull):
    """Barycentrics recomputed with torch ops: same image and same gradients w.r.t. vertices,
    camera and attributes as PyTorch3D's own rasterizer backward, to 1e-5 relative."""
    verts, faces, cam = jittered_grid_mesh()
    attributes = torch.rand(2, verts.shape[1], 4, generator=torch.Generator().manual_seed(1))
    weights = torch.rand(2, 4, 32, 40, generator=torch.Generator().manual_seed(2))
    results = []
    for renderer in (Renderer(faces, (32, 40), cull), PyTorch3DGradientRenderer(faces, (32, 40), cull)):
        leaves = [t.clone().requires_grad_(True) for t in (verts, cam, attributes)]
        out = renderer(*leaves[:2], vertex_attributes=leaves[2])
        (out["image"] * weights).sum().backward()
        results.append([out["image"].detach(), out["mask"]] + [t.grad for t in leaves])
    (image, mask, *grads), (ref_image, ref_mask, *ref_grads) = results
    assert torch.equal(mask, ref_mask) and 0.3 < mask.mean() < 1
    assert max_relative_difference(image, ref_image) < 1e-5
    for grad, ref in zip(grads, ref_grads):
        assert ref.abs().max() > 0 and max_relative_difference(grad, ref) < 1e-5


def test_mesh_out_of_view_renders_empty_with_zero_gradient():
    verts, faces, cam = jittered_grid_mesh()
    verts = (verts + torch.tensor([5.0, 0.0, 0.0])).requires_grad_(True)
    out = Renderer(faces, 16)(verts, cam, vertex_attributes=verts)
    assert out["mask"].sum() == 0
    out["image"].sum().backward()
    assert verts.grad is not None and verts.grad.abs().sum() == 0


def test_vertex_normals_face_the_camera_on_the_face(flame):
    verts = flame(FaceCodes.zeros(1)).vertices
    normals = vertex_normals(verts, flame.faces)
    skin = verts[0, : flame.J_regressor[3].nonzero()[0, 0]]               # skin comes first
    front, top, back = skin[:, 2].argmax(), skin[:, 1].argmax(), skin[:, 2].argmin()
    assert normals[0, front, 2] > 0.5 and normals[0, top, 1] > 0.9 and normals[0, back, 2] < -0.9
    assert torch.allclose(normals.norm(dim=-1), torch.ones(1), atol=1e-4)


# ----------------------------------------------------------------------------- SAFA face maps
def smooth_image(batch=1, size=64):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = torch.stack([0.5 + 0.3 * torch.sin(3 * xx + 1), 0.5 + 0.3 * torch.cos(2 * yy),
                         0.5 + 0.2 * torch.sin(2 * xx + 3 * yy)])
    return image[None].repeat(batch, 1, 1, 1)


def test_translation_gives_constant_flow_in_face_mask(flame):
    maps = FaceMaps(flame, image_size=64)
    source = FaceCodes.zeros(2, scale=7.0)
    source.pose[1, 1] = 0.3
    driving = source.clone()
    shift = torch.tensor([0.02, -0.01])                                    # model units (tx, ty)
    driving.cam[:, 1:] += shift
    out = maps(smooth_image(2), source, driving)
    mask = out["face_mask_driving"][:, 0].bool()
    assert mask.sum() > 300
    motion = out["flow_3d"] - make_coordinate_grid(64, 64)[None]
    # driving moved by s * (dx, -dy) in the image, so the source sits at z - s * (dx, -dy)
    expected = -7.0 * torch.tensor([shift[0], -shift[1]])
    assert (motion[mask] - expected).abs().max() < 1e-5
    assert motion[~mask].abs().max() == 0                                   # identity off the face


def test_source_texture_on_source_pose_reproduces_source(flame):
    maps = FaceMaps(flame, image_size=64)
    codes = FaceCodes.zeros(1, scale=7.0)
    codes.pose[0, 1], codes.exp[0, 0] = 0.25, 1.0
    image = smooth_image()
    out = maps(image, codes, codes)
    mask = out["face_mask_driving"][0, 0].bool()
    error = (out["I_r"][0] - image[0]).abs()[:, mask]
    assert mask.sum() > 300 and error.mean() < 2e-3 and error.max() < 2e-2
    # warping the source with the 3D flow does the same thing for an identical pose
    warped = warp(image, out["flow_3d"])
    assert (warped - image).abs().max() < 1e-5


def test_face_mask_excludes_eyes_and_mouth(flame):
    maps = FaceMaps(flame, image_size=96)
    codes = FaceCodes.zeros(1, scale=8.0)
    out = maps(smooth_image(1, 96), codes, codes)
    pixels = normalized_to_pixels(out["landmarks_driving"][0], 96, 96).round().long()
    mask = out["face_mask_driving"][0, 0]
    at = lambda idx: mask[pixels[idx, 1], pixels[idx, 0]]  # noqa: E731
    assert at(30) == 1 and at(33) == 1                                      # nose
    eye_centres = [pixels[a:a + 6].float().mean(0).round().long() for a in (36, 42)]
    assert all(mask[c[1], c[0]] == 0 for c in eye_centres)
    assert at(62) == 0 and at(66) == 0                                      # inside the lips
    assert out["normal_source"][0, 2][mask.bool()].min() > -0.2             # face normals point at us
    assert out["heatmap_3d"].abs().max() < 1e-6                             # same pose, same normals


def test_gradients_reach_all_codes(flame):
    maps = FaceMaps(flame, image_size=48)
    def make(yaw):
        return FaceCodes(shape=torch.zeros(1, 100, requires_grad=True),
                         exp=torch.zeros(1, 50, requires_grad=True),
                         pose=torch.tensor([[0.0, yaw, 0.0, 0.1, 0.0, 0.0]], requires_grad=True),
                         cam=torch.tensor([[7.0, 0.0, 0.0]], requires_grad=True))
    source, driving = make(0.0), make(0.3)
    image = smooth_image(1, 48).requires_grad_(True)
    out = maps(image, source, driving)
    loss = (out["I_r"] ** 2).sum() + (out["flow_3d"] ** 2).sum() + out["heatmap_3d"].sum()
    loss.backward()
    for codes in (source, driving):
        for name in ("shape", "exp", "pose", "cam"):
            grad = getattr(codes, name).grad
            assert grad is not None and grad.abs().sum() > 0, name
    assert image.grad.abs().sum() > 0


def test_relative_mode_with_reference_equal_to_driving_keeps_source(flame):
    maps = FaceMaps(flame, image_size=48)
    source = FaceCodes.zeros(1, scale=7.0)
    driving = FaceCodes.zeros(1, scale=9.0)
    driving.pose[0, 1] = 0.5
    out = maps(smooth_image(1, 48), source, driving, driving_reference=driving)
    assert (out["flow_3d"] - make_coordinate_grid(48, 48)[None]).abs().max() < 1e-5


def test_driving_normal_shape_option(flame):
    source = FaceCodes.zeros(1, scale=7.0)
    driving = source.clone()
    driving.shape[0, 0], driving.pose[0, 1] = 2.0, 0.2
    image = smooth_image(1, 48)
    paper = FaceMaps(flame, image_size=48)(image, source, driving)
    own = FaceMaps(flame, image_size=48, driving_normal_shape="driving")(image, source, driving)
    assert torch.equal(paper["flow_3d"], own["flow_3d"]) and torch.equal(paper["I_r"], own["I_r"])
    assert not torch.equal(paper["normal_driving"], own["normal_driving"])   # alpha_S vs alpha_D
    with pytest.raises(ValueError):
        FaceMaps(flame, driving_normal_shape="other")


def test_face_maps_and_gradients_match_pytorch3d_path(flame):
    """SAFA's maps and the gradients of a random weighting of them w.r.t. every code and the
    source image equal those of PyTorch3D's rasterizer backward (relative L2 distance < 1e-5;
    measured <= 2.5e-6 at 64 px, the rest is PyTorch3D's float32 rounding in tile coordinates)."""
    generator = torch.Generator().manual_seed(0)
    source = FaceCodes.zeros(2, scale=7.0)
    source.shape[:, :5] = torch.randn(2, 5, generator=generator)
    source.pose[:, 1] = torch.tensor([0.3, -0.4])
    driving = source.clone()
    driving.pose[:, 1], driving.pose[:, 3], driving.exp[:, 0] = torch.tensor([-0.2, 0.1]), 0.2, 1.0
    image = smooth_image(2, 64)
    keys = ("I_r", "normal_source", "normal_driving", "flow_3d", "heatmap_3d")
    results = []
    for renderer in (Renderer(flame.faces, 64), PyTorch3DGradientRenderer(flame.faces, 64)):
        codes = [c.clone() for c in (source, driving)]
        leaves = [getattr(c, name).requires_grad_(True) for c in codes
                  for name in ("shape", "exp", "pose", "cam")] + [image.clone().requires_grad_(True)]
        out = FaceMaps(flame, image_size=64, renderer=renderer)(leaves[-1], *codes)
        weights = torch.Generator().manual_seed(1)
        sum((out[k] * torch.rand(out[k].shape, generator=weights)).sum() for k in keys).backward()
        results.append([out[k].detach() for k in keys] + [t.grad for t in leaves])
    for value, ref in zip(*results):
        assert ref.norm() > 0 and ((value - ref).norm() / ref.norm()).item() < 1e-5
