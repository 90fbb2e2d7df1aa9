"""Albedo + spherical-harmonics shading, the shaded render I_r, the photometric loss and the
3DMM encoder's appearance outputs."""
import math

import pytest
import torch

from flame import FLAME, FaceCodes
from modules.face_maps import FaceMaps
from modules.shading import (LIGHT_DIM, SH_CONSTANTS, ShadedFace, appearance_loss,
                             directional_light, light_color_regularization, neutral_light,
                             photometric_loss, reenactment_codes, sh_basis, sh_shading)

SIZE = 32


@pytest.fixture(scope="module")
def flame():
    return FLAME.open_head()


@pytest.fixture(scope="module")
def shaded(flame):
    return ShadedFace(flame, SIZE)


def appearance_codes(batch=2, seed=0, yaw=0.3):
    g = torch.Generator().manual_seed(seed)
    codes = FaceCodes.zeros(batch, scale=7.0, n_tex=50)
    codes.pose[:, 1] = yaw * torch.linspace(-1, 1, batch)
    codes.shape.normal_(0, 0.5, generator=g)
    codes.exp.normal_(0, 0.5, generator=g)
    codes.tex.normal_(0, 1.0, generator=g)
    direction = torch.tensor([[0.4, 0.3, 0.8]]).repeat(batch, 1)
    return codes.replace(light=directional_light(direction, 0.5, 0.45, (1.0, 0.95, 0.9)))


# ----------------------------------------------------------------------------- SH basis
def test_sh_constants_are_ramamoorthi_hanrahans():
    # the five constants of their irradiance formula (c4, 2 c2, c1, c3 / 3 = c5, c1 in their
    # numbering), printed in the paper to six digits
    published = {"c0": 0.886227, "c1": 2 * 0.511664, "c2": 0.858086, "c3": 0.247708, "c4": 0.429043}
    for name, value in published.items():
        assert SH_CONSTANTS[name] == pytest.approx(value, abs=2e-6), name


def test_directional_light_is_the_clamped_cosine_to_second_order():
    """Irradiance of a distant light truncated to l <= 2, by the addition theorem:
    E(t) = 1/4 + t/2 + 5/16 P2(t), t = n . d; within 0.1 of max(0, t) everywhere."""
    g = torch.Generator().manual_seed(1)
    normals = torch.nn.functional.normalize(torch.randn(1, 500, 3, generator=g), dim=-1)
    direction = torch.nn.functional.normalize(torch.tensor([[0.3, -0.5, 0.8]]), dim=-1)
    shading = sh_shading(normals, directional_light(direction, intensity=1.0))
    t = (normals[0] @ direction[0])
    closed_form = 0.25 + 0.5 * t + 5.0 / 16.0 * (1.5 * t ** 2 - 0.5)
    assert torch.allclose(shading[0], closed_form[:, None].expand(-1, 3), atol=1e-5)
    assert (shading[0, :, 0] - t.clamp_min(0)).abs().max() < 0.1


def test_basis_follows_the_camera_space_normal_convention():
    """+z faces the camera, +y is up: a light from above-front brightens normals pointing up."""
    up, down = torch.tensor([[[0.0, 0.6, 0.8]]]), torch.tensor([[[0.0, -0.6, 0.8]]])
    light = directional_light(torch.tensor([[0.0, 1.0, 1.0]]), intensity=1.0)
    assert sh_shading(up, light)[0, 0, 0] > sh_shading(down, light)[0, 0, 0] + 0.3
    assert sh_basis(up).shape == (1, 1, 9)
    assert torch.allclose(sh_shading(up, neutral_light(1)), torch.ones(1, 1, 3))


def test_light_codes_must_hold_27_values():
    with pytest.raises(ValueError, match="27"):
        sh_shading(torch.zeros(1, 4, 3), torch.zeros(1, 12))


# ----------------------------------------------------------------------------- the shaded render
def test_ambient_only_light_reproduces_albedo_times_a_constant(shaded):
    codes = appearance_codes(2, seed=2)
    color = torch.tensor([0.9, 0.7, 0.5])
    ambient = directional_light(torch.tensor([[0.0, 0.0, 1.0]] * 2), intensity=0.0, ambient=0.8,
                                color=color)
    out = shaded(codes.replace(light=ambient))
    mask = out["mask"]
    assert mask.sum() > 200
    expected = out["albedo"] * (0.8 * color)[None, :, None, None]
    assert torch.allclose(out["image"], expected, atol=1e-5)
    assert torch.allclose(out["shading"] * mask, (0.8 * color)[None, :, None, None] * mask, atol=1e-4)
    # the neutral light is the albedo itself
    assert torch.allclose(shaded(codes.replace(light=neutral_light(2)))["image"], out["albedo"],
                          atol=1e-5)


def test_changing_only_the_light_changes_shading_not_rasterization_nor_flow(flame, shaded):
    source = appearance_codes(1, seed=3, yaw=0.0)
    driving = appearance_codes(1, seed=4, yaw=0.0)
    driving.pose[:, 1], driving.exp = 0.25, driving.exp * 2
    other = source.replace(light=directional_light(torch.tensor([[-0.7, -0.2, 0.6]]), 0.7, 0.3))
    target, target_other = reenactment_codes(source, driving), reenactment_codes(other, driving)
    a, b = shaded(target), shaded(target_other)
    assert torch.equal(a["fragments"].pix_to_face, b["fragments"].pix_to_face)
    assert torch.equal(a["face_mask"], b["face_mask"]) and torch.equal(a["albedo"], b["albedo"])
    face = a["face_mask"].bool().expand(-1, 3, -1, -1)
    assert (a["image"] - b["image"])[face].abs().mean() > 0.05           # shading changed
    maps = FaceMaps(flame, SIZE)
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(maps(image, source, driving)["flow_3d"], maps(image, other, driving)["flow_3d"])
    # v_t takes identity, texture and light from the source, expression and pose from the driving
    assert torch.equal(target.shape, source.shape) and torch.equal(target.tex, source.tex)
    assert torch.equal(target.light, source.light) and torch.equal(target.exp, driving.exp)
    assert torch.equal(target.pose, driving.pose) and torch.equal(target.cam, driving.cam)


def test_face_region_excludes_eyes_and_mouth_and_missing_light_is_an_error(shaded):
    codes = appearance_codes(1, seed=5, yaw=0.0)
    out = shaded(codes)
    assert out["face_mask"].sum() < out["mask"].sum() and (out["face_mask"] <= out["mask"]).all()
    assert out["landmarks"].shape == (1, 68, 2)
    with pytest.raises(ValueError, match="no light"):
        shaded(codes.replace(light=None))


def test_gradients_reach_albedo_light_and_geometry_codes(shaded):
    target = shaded(appearance_codes(2, seed=6))["image"].detach()
    codes = appearance_codes(2, seed=7)
    for name in ("shape", "exp", "pose", "cam", "tex", "light"):
        getattr(codes, name).requires_grad_(True)
    out = shaded(codes)
    photometric_loss(out["image"], target, out["face_mask"]).backward()
    for name in ("shape", "exp", "pose", "cam", "tex", "light"):
        grad = getattr(codes, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_photometric_fit_recovers_the_appearance(shaded):
    """With the geometry known, Adam on (tex, light) from the mean albedo and neutral light
    brings the render onto the target (the pretraining's photometric term can do its job)."""
    truth = appearance_codes(1, seed=8, yaw=0.2)
    target = shaded(truth)
    codes = truth.replace(tex=torch.zeros_like(truth.tex).requires_grad_(True),
                          light=neutral_light(1).requires_grad_(True))
    optimizer = torch.optim.Adam([codes.tex, codes.light], lr=0.06)
    losses = []
    for _ in range(50):
        out = shaded(codes)
        loss = photometric_loss(out["image"], target["image"].detach(), target["face_mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0] and losses[-1] < 0.02


# ----------------------------------------------------------------------------- losses
def test_photometric_loss_is_the_masked_mean_of_per_pixel_l2_norms():
    rendered, image = torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    image[0, :, 0, 0] = torch.tensor([0.3, 0.4, 0.0])      # norm 0.5, inside the mask
    image[0, :, 1, 1] = torch.tensor([1.0, 1.0, 1.0])      # outside the mask: ignored
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    assert photometric_loss(rendered, image, mask).item() == pytest.approx(0.5 / 3, abs=2e-6)
    weights = torch.tensor([[[[2.0, 1.0], [1.0, 1.0]]]])
    assert photometric_loss(rendered, image, mask, weights).item() == pytest.approx(1.0 / 4, abs=2e-6)
    assert photometric_loss(rendered, image, torch.zeros_like(mask)).item() < 1e-6
    with pytest.raises(ValueError, match="shape"):
        photometric_loss(rendered, image[:, :, :1], mask)


def test_regularizers_and_appearance_loss():
    codes = FaceCodes.zeros(2, n_tex=4).replace(light=neutral_light(2))
    assert light_color_regularization(codes).item() == pytest.approx(0.0, abs=1e-12)
    tinted = codes.light.clone().view(2, 9, 3)
    tinted[:, 1] = torch.tensor([1.0, 0.0, 0.0])           # deviations 2/3, -1/3, -1/3
    assert light_color_regularization(codes.replace(light=tinted)).item() == pytest.approx(2 / 3)
    image = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    total, terms = appearance_loss(image, image, torch.ones(2, 1, 4, 4),
                                   codes.replace(tex=torch.ones(2, 4)))
    assert terms["texture_regularization"].item() == pytest.approx(4.0)
    assert terms["photometric"].item() < 1e-5 and total.item() == pytest.approx(4.0e-3, abs=2e-5)


# ----------------------------------------------------------------------------- encoder
def test_encoder_regresses_texture_and_light_after_the_geometry_rows():
    from modules.tdmm_encoder import TDMMEncoder
    kwargs = dict(imagenet=False, allow_random_init=True)
    geometry = TDMMEncoder(**kwargs).eval()
    full = TDMMEncoder(n_tex=50, n_light=LIGHT_DIM, **kwargs).eval()
    assert full.code_dim == 159 + 50 + 27 and geometry.code_dim == 159
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    codes = full(images).codes
    assert torch.equal(codes.tex, torch.zeros(2, 50))                       # mean albedo
    assert torch.allclose(codes.light, neutral_light(2))                     # ambient white
    # a geometry-only checkpoint: same keys and shapes, and its rows are the first 159
    with torch.no_grad():
        geometry.head.weight.normal_(0, 0.01)
        geometry.head.bias.normal_(0, 0.1)
    state = geometry.state_dict()
    TDMMEncoder(**kwargs).load_state_dict(state)
    full.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")}, strict=False)
    with torch.no_grad():
        full.head.weight[:159], full.head.bias[:159] = state["head.weight"], state["head.bias"]
    ours, theirs = full(images).codes, geometry(images).codes
    for name in ("shape", "exp", "pose", "cam"):
        assert torch.allclose(getattr(ours, name), getattr(theirs, name), atol=1e-6), name
    with pytest.raises(ValueError, match="n_light"):
        TDMMEncoder(n_light=9, **kwargs)


def test_first_render_of_a_fresh_encoder_is_the_mean_albedo(flame, shaded):
    from modules.tdmm_encoder import TDMMEncoder
    encoder = TDMMEncoder(n_tex=flame.n_tex, n_light=LIGHT_DIM, imagenet=False,
                          allow_random_init=True, initial_scale=7.0).eval()
    codes = encoder(torch.rand(1, 3, 64, 64)).codes
    out = shaded(codes)
    assert torch.allclose(out["image"], out["albedo"], atol=1e-5)
    mean = flame.albedo(torch.zeros(1, flame.n_tex))
    assert torch.allclose(shaded.vertex_colors(codes, flame(codes).vertices)[1], mean)
    assert math.isclose(float(codes.cam[0, 0].detach()), 7.0)
