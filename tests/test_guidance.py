"""Guidance renders of the progressive-warping model (modules/guidance.py) on the open head."""
import pytest
import torch

from flame import FLAME, FaceCodes, ensure_open_head
from modules.coords import make_coordinate_grid
from modules.editing import FaceEdit, edit_codes
from modules.guidance import GUIDANCE_KINDS, GuidanceRenderer, mean_face, with_source_shape
from modules.renderer import Renderer, face_normals, screen_vertices, weak_perspective

SIZE = 48
SCALE = 8.0


@pytest.fixture(scope="module")
def flame():
    return FLAME.from_assets(ensure_open_head(), n_shape=10, n_exp=10)


def neutral(batch=1):
    return FaceCodes.zeros(batch, n_shape=10, n_exp=10, scale=SCALE)


def visible_faces(renderer, vertices, cam):
    """Face indices seen in a render (sorted, unique)."""
    fragments = renderer.rasterize(screen_vertices(vertices, cam), SIZE)
    faces = fragments.pix_to_face
    return faces[faces >= 0].unique(), fragments


def test_guidance_switch_sizes_and_consistency(flame):
    torch.manual_seed(0)
    source = neutral(2)
    driving = edit_codes(source, FaceEdit(yaw=15.0, jaw_open=10.0))
    renders = {kind: GuidanceRenderer(flame, SIZE, kind) for kind in GUIDANCE_KINDS}
    renders["neural_codes"].vertex_codes.data.copy_(renders["both"].vertex_codes.data)
    maps = {kind: r(source, driving) for kind, r in renders.items()}
    expected = {"geom_disp": (0, 2), "neural_codes": (16, 16), "both": (16, 18), "nmfc": (3, 3)}
    for kind, (encoder_channels, decoder_channels) in expected.items():
        r, m = renders[kind], maps[kind]
        assert (r.encoder_channels, r.decoder_channels) == (encoder_channels, decoder_channels)
        assert m.decoder_guidance.shape == (2, decoder_channels, SIZE, SIZE)
        assert (m.encoder_input is None) == (encoder_channels == 0)
        if m.encoder_input is not None:
            assert m.encoder_input.shape == (2, encoder_channels, SIZE, SIZE)
    # 'both' = the displacement, then the driving codes; its encoder input = the source codes
    torch.testing.assert_close(maps["both"].decoder_guidance[:, :2], maps["geom_disp"].decoder_guidance)
    torch.testing.assert_close(maps["both"].decoder_guidance[:, 2:],
                               maps["neural_codes"].decoder_guidance)
    torch.testing.assert_close(maps["both"].encoder_input, maps["neural_codes"].encoder_input)
    with pytest.raises(ValueError, match="unknown guidance 'codes'"):
        GuidanceRenderer(flame, SIZE, "codes")


def test_geometric_displacement_of_a_translation_is_constant_on_the_driving_face(flame):
    source = neutral()
    pixel = 2.0 / (SIZE - 1)                                     # one pixel, normalized
    driving = edit_codes(source, FaceEdit(translation_offset=(5 * pixel, -2 * pixel)))
    maps = GuidanceRenderer(flame, SIZE, "geom_disp")(source, driving)
    mask = maps.driving_mask[0, 0].bool()
    displacement = maps.decoder_guidance[0]                      # P(M_S) - P(M_D)
    assert mask.sum() > 300
    torch.testing.assert_close(displacement[0][mask], torch.full((int(mask.sum()),), -5 * pixel),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(displacement[1][mask], torch.full((int(mask.sum()),), 2 * pixel),
                               atol=1e-5, rtol=0)
    assert displacement[:, ~mask].abs().max() == 0               # nothing off the driving mesh
    # it is a backward flow: z + D(z) is where the surface point is in the source (a whole-pixel
    # shift, so it lands on pixel centres; the neck runs out of the image: points inside only)
    flow = make_coordinate_grid(SIZE, SIZE) + displacement.permute(1, 2, 0)
    source_mask = GuidanceRenderer(flame, SIZE, "geom_disp")(source, source).driving_mask[0, 0]
    sampled = torch.nn.functional.grid_sample(source_mask[None, None], flow[None],
                                              align_corners=True)[0, 0]
    inside = mask & (flow.abs() <= 1).all(-1)
    assert inside.sum() > 300 and sampled[inside].min() > 0.999


def test_back_face_culling_hides_the_far_side(flame):
    """Head turned away and tipped (yaw 180, pitch 90): the open neck shows the inside of the back
    of the head; without culling those back faces are drawn, the guidance never draws them."""
    codes = edit_codes(neutral(), FaceEdit(yaw=180.0, pitch=90.0))
    vertices = flame(codes).vertices
    facing = face_normals(vertices, flame.faces)[0, :, 2] > 0    # camera looks down -Z
    guidance = GuidanceRenderer(flame, SIZE, "geom_disp")
    shown, _ = visible_faces(guidance.renderer, vertices, codes.cam)
    assert shown.numel() > 100 and facing[shown].all()
    uncull = Renderer(flame.faces, SIZE, cull_backfaces=False)
    shown_all, fragments = visible_faces(uncull, vertices, codes.cam)
    back_pixels = (fragments.pix_to_face >= 0) & ~facing[fragments.pix_to_face.clamp_min(0)]
    assert back_pixels.sum() > 30                                # the far side is in view here
    culled = guidance.renderer.rasterize(screen_vertices(vertices, codes.cam), SIZE)
    assert (culled.pix_to_face[back_pixels] != fragments.pix_to_face[back_pixels]).all()


def test_nmfc_of_the_mean_face_is_the_identity_color_map(flame):
    """Frontal mean face, camera (s, 0, 0): the pixel at normalized (x, y) shows the surface point
    X = x / s, Y = -y / s, so red and green are linear ramps of the pixel position and blue
    peaks at the nose tip."""
    maps = GuidanceRenderer(flame, SIZE, "nmfc")(neutral(), neutral())
    nmfc, mask = maps.decoder_guidance[0], maps.driving_mask[0, 0].bool()
    mean = mean_face(flame)
    low, high = mean.amin(0), mean.amax(0)
    grid = make_coordinate_grid(SIZE, SIZE)
    expected_red = (grid[..., 0] / SCALE - low[0]) / (high[0] - low[0])
    expected_green = (-grid[..., 1] / SCALE - low[1]) / (high[1] - low[1])
    assert mask.sum() > 500
    assert (nmfc[0][mask] - expected_red[mask]).abs().max() < 1e-4
    assert (nmfc[1][mask] - expected_green[mask]).abs().max() < 1e-4
    assert nmfc[:, mask].min() >= 0 and nmfc[:, mask].max() <= 1
    nose = weak_perspective(mean[mean[:, 2].argmax()][None, None], neutral().cam)[0, 0]
    nose_pixel = torch.round((nose + 1) * (SIZE - 1) / 2)
    blue = torch.where(mask, nmfc[2], torch.zeros_like(nmfc[2]))
    row, col = divmod(int(blue.argmax()), SIZE)
    assert abs(col - nose_pixel[0]) <= 1 and abs(row - nose_pixel[1]) <= 1
    assert blue.max() > 0.97


def test_neural_code_gradients_reach_the_visible_vertex_codes(flame):
    torch.manual_seed(0)
    guidance = GuidanceRenderer(flame, SIZE, "neural_codes")
    source = neutral()
    driving = edit_codes(source, FaceEdit(yaw=-60.0))
    maps = guidance(source, driving)
    weights = torch.randn_like(maps.decoder_guidance)
    (maps.decoder_guidance * weights).sum().backward()          # the driving render only
    moved = guidance.vertex_codes.grad.abs().sum(1) > 0
    driving_faces, _ = visible_faces(guidance.renderer, flame(driving).vertices, driving.cam)
    seen = torch.zeros_like(moved)
    seen[flame.faces[driving_faces].flatten()] = True
    assert moved.sum() > 200
    assert not (moved & ~seen).any()                             # only vertices in view get any
    assert (moved & seen).sum() >= 0.9 * seen.sum()
    guidance.vertex_codes.grad = None
    guidance(source, driving).encoder_input.sum().backward()     # the source render reaches them too
    source_moved = guidance.vertex_codes.grad.abs().sum(1) > 0
    assert source_moved.sum() > 200 and not torch.equal(source_moved, moved)


def test_yaw_edit_turns_the_rendered_guidance_to_image_right(flame):
    """+20 degrees of yaw: the nose tip (the nearest point: NMFC blue peak) moves right in the
    render, and the displacement there points back left to the frontal source."""
    source = neutral()
    driving = edit_codes(source, FaceEdit(yaw=20.0))
    nmfc = GuidanceRenderer(flame, SIZE, "nmfc")

    def nose_column(codes):
        maps = nmfc(codes, codes)
        blue = maps.decoder_guidance[0, 2] * maps.driving_mask[0, 0]
        return int(blue.argmax()) % SIZE

    assert nose_column(driving) >= nose_column(source) + 2
    displacement = GuidanceRenderer(flame, SIZE, "geom_disp")(source, driving).decoder_guidance[0]
    row, col = divmod(int((nmfc(driving, driving).decoder_guidance[0, 2]).argmax()), SIZE)
    assert displacement[0, row, col] < -0.05
    nose_tip = 30                                                # iBUG landmark index
    x_before = weak_perspective(flame(source).landmarks, source.cam)[0, nose_tip, 0]
    x_after = weak_perspective(flame(driving).landmarks, driving.cam)[0, nose_tip, 0]
    assert x_after > x_before + 0.05


def test_with_source_shape_keeps_the_driving_motion():
    source, driving = neutral(), neutral()
    source.shape[:, 0] = 2.0
    driving.exp[:, 0] = 1.0
    mixed = with_source_shape(source, driving)
    assert torch.equal(mixed.shape, source.shape) and torch.equal(mixed.exp, driving.exp)
