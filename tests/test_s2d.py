"""Sparse-to-dense motion: Add_Motion, AdaIN switches, local branches and eq. 3, the residual/mask
generator (eq. 2) and the parsing loss (eq. 7)."""
import numpy as np
import pytest
import torch

from modules.coords import make_coordinate_grid, warp
from modules.face_parsing import parsing_loss, warp_labels
from modules.s2d_generator import ResidualMaskGenerator
from modules.s2d_motion import (REGION_ORDER, AddMotion, LandmarkMotionNet, SparseToDenseMotion,
                                patch_half_extent, region_centres)

TINY = dict(block_expansion=8, max_features=16, num_blocks=3, local_block_expansion=8,
            local_max_features=16, local_num_blocks=2, adain_hidden=16)


def face_landmarks(batch=2, num_landmarks=74, seed=0):
    """Landmark sets spread like a face: eyes up left/right, mouth below (normalized)."""
    generator = torch.Generator().manual_seed(seed)
    points = torch.rand(batch, num_landmarks, 2, generator=generator) * 0.5 - 0.25
    points[:, 17:22] += torch.tensor([-0.35, -0.45])
    points[:, 36:42] += torch.tensor([-0.35, -0.3])
    points[:, 22:27] += torch.tensor([0.35, -0.45])
    points[:, 42:48] += torch.tensor([0.35, -0.3])
    points[:, 48:68] = points[:, 48:68] * 0.5 + torch.tensor([0.0, 0.5])
    if num_landmarks == 74:
        points[:, [68, 69, 72]] = points[:, 36:39] + 0.02
        points[:, [70, 71, 73]] = points[:, 42:45] + 0.02
    return points.clamp(-0.9, 0.9)


def randomize_heads(module, scale=0.5):
    """Non-zero output heads (they start at zero), so every branch moves something."""
    torch.manual_seed(1)
    for net in module.modules():
        if isinstance(net, LandmarkMotionNet):
            torch.nn.init.normal_(net.head.weight, std=scale * 0.05)
            torch.nn.init.normal_(net.head.bias, std=scale)


def test_add_motion_of_identical_landmarks_adds_nothing():
    layer = AddMotion(5, 12)
    features = torch.randn(2, 5, 4, 4)
    torch.testing.assert_close(layer(features, torch.zeros(2, 12)), features, rtol=0, atol=0)
    assert not torch.allclose(layer(features, torch.ones(2, 12)), features)
    # in the whole network: S = D gives exactly the output of the network without Add_Motion
    torch.manual_seed(0)
    net = LandmarkMotionNet(20, 2, block_expansion=8, max_features=16, num_blocks=2,
                            adain_hidden=16)
    torch.nn.init.normal_(net.head.weight, std=0.1)
    image, vector = torch.rand(2, 3, 16, 16), torch.randn(2, 20)
    with_layers = net(image, vector, vector)
    net.bottleneck_motion = None
    for block in net.up_blocks:
        block.add_motion = None
    torch.testing.assert_close(net(image, vector, vector), with_layers, rtol=0, atol=0)


def test_identity_at_initialization_and_backward_flow_convention():
    net = SparseToDenseMotion(use_local_branches=False, **TINY)
    image, landmarks = torch.rand(2, 3, 32, 32), face_landmarks()
    out = net(image, landmarks, face_landmarks(seed=1))
    grid = make_coordinate_grid(32, 32)[None].expand(2, -1, -1, -1)
    torch.testing.assert_close(out["deformation"], grid)                       # zero heads
    torch.testing.assert_close(warp(image, out["deformation"]), image, atol=1e-5, rtol=0)
    assert out["local_masks"] == {}


def test_landmarks_enter_only_through_adain_and_add_motion():
    """Without AdaIN the global branch sees the landmarks only as D - S: moving both sets alike
    changes nothing; with AdaIN it changes the motion."""
    image, source, driving = torch.rand(1, 3, 32, 32), face_landmarks(1), face_landmarks(1, seed=1)
    for adain in (False, True):
        torch.manual_seed(0)
        net = SparseToDenseMotion(use_adain=adain, use_local_branches=False, **TINY)
        randomize_heads(net)
        first = net(image, source, driving)["deformation"]
        second = net(image, source + 0.1, driving + 0.1)["deformation"]
        assert torch.allclose(first, second, atol=1e-6) == (not adain)
    torch.manual_seed(0)
    plain = SparseToDenseMotion(use_adain=False, use_add_motion=False, use_local_branches=False,
                                **TINY)
    randomize_heads(plain)
    torch.testing.assert_close(plain(image, source, driving)["deformation"],
                               plain(image, driving, source)["deformation"])   # blind to both


@pytest.mark.parametrize("num_landmarks", [74, 68])
def test_each_local_branch_changes_motion_only_inside_its_region(num_landmarks):
    torch.manual_seed(0)
    net = SparseToDenseMotion(num_landmarks=num_landmarks, **TINY)
    randomize_heads(net)
    image = torch.rand(2, 3, 64, 64)
    source, driving = face_landmarks(2, num_landmarks), face_landmarks(2, num_landmarks, seed=1)
    out = net(image, source, driving)
    global_flow, fused = out["global_deformation"], out["deformation"]
    size = net.patch_size((64, 64))
    assert size == 16 and out["local_patches"]["mouth"].shape == (2, 3, 16, 16)
    half = patch_half_extent(size, (64, 64), image)
    grid = make_coordinate_grid(64, 64)
    windows = {}
    for name in REGION_ORDER:
        centre = region_centres(driving, net.regions[name])                     # B x 2
        offset = (grid[None] - centre[:, None, None]).abs() / half
        windows[name] = (offset <= 1 + 2 / (size - 1)).all(-1)                  # +1 px: bilinear
        mask = out["local_masks"][name][:, 0]
        assert not mask[~windows[name]].any()                                   # 0 outside
        assert mask[windows[name]].mean() > 0.05
    changed = (fused - global_flow).abs().amax(-1) > 0
    inside_any = windows["left_eye_brow"] | windows["right_eye_brow"] | windows["mouth"]
    assert changed.any() and not changed[~inside_any].any()
    # where only one window covers a pixel, eq. 3 holds: F = f_G (1 - m) + f-hat m
    for name in REGION_ORDER:
        alone = windows[name] & (sum(windows[n].int() for n in REGION_ORDER) == 1)
        m = out["local_masks"][name].permute(0, 2, 3, 1)
        expected = global_flow * (1 - m) + out["local_deformations"][name] * m
        torch.testing.assert_close(fused[alone], expected[alone], atol=1e-6, rtol=0)
    # switching a branch off leaves its region to the global motion
    del net.local_branches["mouth"]
    without = net(image, source, driving)["deformation"]
    torch.testing.assert_close(without[~windows["mouth"]], fused[~windows["mouth"]])
    assert not torch.allclose(without[windows["mouth"]], fused[windows["mouth"]])


def test_local_branches_start_as_the_region_translation():
    net = SparseToDenseMotion(**TINY)
    image, source = torch.rand(1, 3, 64, 64), face_landmarks(1)
    driving = source + torch.tensor([0.08, -0.05])
    driving[:, 48:68] += torch.tensor([0.03, 0.1])                      # the mouth moves more
    out = net(image, source, driving)
    grid = make_coordinate_grid(64, 64)[None]
    for name, shift in (("left_eye_brow", (0.08, -0.05)), ("mouth", (0.11, 0.05))):
        inside = out["local_masks"][name][0, 0] > 0.49                          # sigmoid(0) = 0.5
        local = out["local_deformations"][name][0][inside]
        torch.testing.assert_close(local, grid[0][inside] - torch.tensor(shift), atol=1e-5, rtol=0)


def test_bad_landmarks_are_clear_errors():
    net = SparseToDenseMotion(**TINY)
    image, points = torch.rand(1, 3, 32, 32), face_landmarks(1)
    with pytest.raises(ValueError, match="B x 74 x 2"):
        net(image, points[:, :68], points[:, :68])
    broken = points.clone()
    broken[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        net(image, broken, points)


# ----------------------------------------------------------------------------- generator
@pytest.mark.parametrize("motion_input", [True, False])
def test_generator_blends_warped_source_and_residual_by_the_mask(motion_input):
    torch.manual_seed(0)
    generator = ResidualMaskGenerator(block_expansion=8, max_features=16, num_bottleneck_blocks=1,
                                      use_motion_input=motion_input)
    assert generator.input_block.conv.in_channels == (5 if motion_input else 3)
    source = torch.rand(2, 3, 32, 32)
    flow = make_coordinate_grid(32, 32)[None].repeat(2, 1, 1, 1) + 0.05 * torch.randn(2, 1, 1, 2)
    out = generator(source, flow)
    torch.testing.assert_close(out["deformed"], warp(source, flow))              # E, eq. 1
    expected = out["deformed"] * (1 - out["mask"]) + out["residual"] * out["mask"]
    torch.testing.assert_close(out["prediction"], expected)                      # eq. 2
    assert out["mask"].shape == (2, 1, 32, 32) and 0 < float(out["mask"].detach().min())
    out["prediction"].mean().backward()
    assert generator.input_block.conv.weight.grad.abs().max() > 0


# ----------------------------------------------------------------------------- parsing loss
def test_parsing_loss_value_is_the_mismatch_fraction():
    rng = np.random.RandomState(0)
    labels = torch.tensor(rng.randint(0, 9, size=(2, 12, 12)))
    identity = make_coordinate_grid(12, 12)[None].repeat(2, 1, 1, 1)
    assert float(parsing_loss(labels, labels, identity)) == 0.0
    # sampling one pixel to the right: compare labels[:, :, j + 1] with the driving map by hand
    shifted = identity + torch.tensor([2.0 / 11, 0.0])
    warped = np.concatenate([labels[:, :, 1:].numpy(), np.zeros((2, 12, 1), int)], axis=2)
    assert np.array_equal(warp_labels(labels, shifted).numpy(), warped)         # nearest + bg
    expected = (warped != labels.numpy()).mean()
    assert abs(float(parsing_loss(labels, labels, shifted)) - expected) < 1e-6
    # a driving map that is the shifted source matches exactly
    assert float(parsing_loss(labels, torch.tensor(warped), shifted)) == 0.0


def test_parsing_loss_gradient_moves_the_flow_towards_agreement():
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[:, 4:12, 4:10] = 3                                                    # a block
    driving = torch.roll(labels, shifts=2, dims=2)                               # moved right 2 px
    grid = make_coordinate_grid(16, 16)[None]
    offset = torch.zeros(1, 1, 1, 2, requires_grad=True)
    losses = []
    optimizer = torch.optim.SGD([offset], lr=0.05)
    for _ in range(40):
        loss = parsing_loss(labels, driving, grid + offset)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # backward flow: the driving pixel p reads the source at p - 2 px
    assert losses[0] > 0.1 and losses[-1] == 0.0
    assert abs(float(offset[0, 0, 0, 0]) * 15 / 2 + 2) < 0.5                      # pixels
    with pytest.raises(TypeError, match="integer labels"):
        parsing_loss(labels.float(), driving, grid)
    with pytest.raises(ValueError, match="outside 0..8"):
        parsing_loss(labels + 9, driving, grid)
