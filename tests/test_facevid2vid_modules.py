"""face-vid2vid building blocks checked by hand computations (golden parity: test_parity_*)."""
import math

import pytest
import torch

from modules.blocks_3d import Hourglass3d
from modules.coords import make_coordinate_grid_3d, warp_volume
from modules.facevid2vid_losses import expression_loss, keypoint_prior_loss
from modules.generator_3d import OcclusionAwareGenerator3d
from modules.keypoints_3d import (bins_to_degrees, head_pose_degrees, rotation_matrix,
                                  transform_keypoints)
from modules.util import kp2gaussian, sparse_affine_flows

TINY_GENERATOR = dict(num_kp=3, feature_channel=4, block_expansion=4, max_features=16,
                      num_down_blocks=2, reshape_channel=4, reshape_depth=4, num_resblocks=1,
                      dense_motion_params=dict(block_expansion=4, max_features=8, num_blocks=2,
                                               reshape_depth=4, compress=2))


def test_bins_to_degrees_is_the_expected_bin_centre():
    logits = torch.full((2, 66), -1e4)
    logits[0, 33] = 0.0                        # all mass on bin 33: 33 * 3 - 99 = 0 degrees
    logits[1, 10] = logits[1, 12] = 0.0        # half on 10, half on 12: bin 11 -> -66 degrees
    torch.testing.assert_close(bins_to_degrees(logits), torch.tensor([0.0, -66.0]))


def test_free_view_overrides_replace_only_the_given_angle():
    torch.manual_seed(0)
    pose = {name: torch.randn(3, 66) for name in ("yaw", "pitch", "roll")}
    degrees = head_pose_degrees(pose, pitch=12.5)
    assert torch.equal(degrees["pitch"], torch.full((3,), 12.5))
    assert torch.equal(degrees["yaw"], bins_to_degrees(pose["yaw"]))


def test_rotation_matrix_axes_and_order():
    angle = torch.tensor([30.0])
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    # yaw turns about y: the x axis goes to (cos, 0, -sin)
    rotation = rotation_matrix(angle, torch.zeros(1), torch.zeros(1), pi=math.pi)[0]
    torch.testing.assert_close(rotation[:, 0], torch.tensor([c, 0.0, -s]))
    # pitch about x, roll about z
    pitch = rotation_matrix(torch.zeros(1), angle, torch.zeros(1), pi=math.pi)[0]
    torch.testing.assert_close(pitch[:, 1], torch.tensor([0.0, c, s]))
    roll = rotation_matrix(torch.zeros(1), torch.zeros(1), angle, pi=math.pi)[0]
    torch.testing.assert_close(roll[:, 0], torch.tensor([c, s, 0.0]))
    # R = R_x(pitch) R_y(yaw) R_z(roll), orthonormal
    yaw, pitch_deg, roll_deg = torch.tensor([10.0]), torch.tensor([20.0]), torch.tensor([-35.0])
    full = rotation_matrix(yaw, pitch_deg, roll_deg)
    product = (rotation_matrix(0 * yaw, pitch_deg, 0 * yaw) @ rotation_matrix(yaw, 0 * yaw, 0 * yaw)
               @ rotation_matrix(0 * yaw, 0 * yaw, roll_deg))
    torch.testing.assert_close(full, product)
    torch.testing.assert_close(full @ full.transpose(1, 2), torch.eye(3)[None], atol=1e-6,
                               rtol=0)


def test_transform_keypoints_forms_by_hand():
    torch.manual_seed(0)
    canonical = {"value": torch.randn(2, 4, 3), "jacobian": torch.randn(2, 4, 3, 3)}
    rotation = rotation_matrix(torch.tensor([10.0, -5.0]), torch.tensor([3.0, 7.0]),
                               torch.tensor([0.0, 20.0]))
    translation, delta = torch.randn(2, 3), torch.randn(2, 12)
    scale = torch.tensor([0.5, 2.0])
    x_c, d = canonical["value"], delta.view(2, 4, 3)
    rotated = (rotation[:, None] @ x_c[..., None])[..., 0]
    posed = transform_keypoints(canonical, rotation, translation, delta)
    torch.testing.assert_close(posed["value"], rotated + translation[:, None] + d)
    torch.testing.assert_close(posed["jacobian"], rotation[:, None] @ canonical["jacobian"])
    scaled = transform_keypoints(canonical, rotation, translation, delta, scale=scale)
    torch.testing.assert_close(scaled["value"],
                               scale[:, None, None] * rotated + translation[:, None] + d)
    in_canonical = transform_keypoints(canonical, rotation, translation, delta, scale=scale,
                                       expression_frame="canonical")
    expected = scale[:, None, None] * (rotation[:, None] @ (x_c + d)[..., None])[..., 0]
    torch.testing.assert_close(in_canonical["value"], expected + translation[:, None])
    with pytest.raises(ValueError, match="expression deltas"):
        transform_keypoints(canonical, rotation, translation, torch.randn(2, 15))


def test_3d_gaussians_and_sparse_flows():
    kp = torch.tensor([[[0.5, -0.5, 0.0]]])
    heatmap = kp2gaussian(kp, (5, 5, 5))
    assert heatmap.shape == (1, 1, 5, 5, 5)
    assert heatmap[0, 0, 2, 1, 3] == pytest.approx(1.0)     # z=0 -> depth 2, y=-.5 -> 1, x=.5 -> 3
    flows = sparse_affine_flows({"value": kp}, {"value": kp + 0.25}, (3, 4, 5))
    grid = make_coordinate_grid_3d(3, 4, 5)
    torch.testing.assert_close(flows[0, 0], grid + 0.25)    # translation only: z + (p_S - p_D)
    with pytest.raises(ValueError, match="3D spatial_size"):
        kp2gaussian(kp, (5, 5))


def test_volume_warp_with_the_identity_grid():
    volume = torch.randn(1, 2, 3, 4, 5)
    grid = make_coordinate_grid_3d(3, 4, 5)[None]
    torch.testing.assert_close(warp_volume(volume, grid, align_corners=True), volume)
    # the reference convention (align_corners=False) reads the same grid half a voxel outwards
    assert not torch.allclose(warp_volume(volume, grid, align_corners=False), volume)


def test_hourglass_3d_keeps_depth_and_size():
    network = Hourglass3d(block_expansion=4, in_features=3, num_blocks=2, max_features=8)
    out = network(torch.randn(2, 3, 4, 8, 8))
    assert out.shape == (2, network.out_filters, 4, 8, 8) and network.out_filters == 7


@pytest.mark.parametrize("decoder", ["original", "spade"])
def test_generator_runs_with_both_decoders(decoder):
    torch.manual_seed(0)
    spade = dict(out_features=4, num_middle_blocks=1, hidden=8) if decoder == "spade" else None
    generator = OcclusionAwareGenerator3d(decoder=decoder, spade_params=spade, **TINY_GENERATOR)
    kp_source = {"value": 0.3 * torch.randn(2, 3, 3)}
    kp_driving = {"value": kp_source["value"] + 0.1}
    output = generator(torch.rand(2, 3, 32, 32), kp_driving=kp_driving, kp_source=kp_source)
    assert output["prediction"].shape == (2, 3, 32, 32)
    assert output["deformation"].shape == (2, 4, 8, 8, 3)
    assert output["mask"].shape == (2, 4, 4, 8, 8)
    assert output["occlusion_map"].shape == (2, 1, 8, 8)
    assert generator.first.conv.kernel_size == ((7, 7) if decoder == "original" else (3, 3))


def test_generator_rejects_inconsistent_widths():
    with pytest.raises(ValueError, match="max_features .* must equal reshape_channel"):
        OcclusionAwareGenerator3d(**{**TINY_GENERATOR, "max_features": 32})
    with pytest.raises(ValueError, match="feature_channel .* must equal"):
        OcclusionAwareGenerator3d(**{**TINY_GENERATOR, "feature_channel": 8})
    with pytest.raises(ValueError, match="unknown generator decoder"):
        OcclusionAwareGenerator3d(decoder="multiscale", **TINY_GENERATOR)


def test_keypoint_prior_by_hand():
    # two keypoints 0.2 apart in x at depth 0.33 and 0.43: pairs (0,1), (1,0) are beyond
    # sqrt(0.1), the two self-pairs add 0.1 - (sqrt(3) eps)^2 each; mean depth off by 0.05
    kp = torch.tensor([[[0.0, 0.0, 0.33], [0.5, 0.0, 0.43]]], dtype=torch.float64)
    expected = 2 * (0.1 - 3e-12) + 0.05
    assert keypoint_prior_loss(kp).item() == pytest.approx(expected, rel=1e-12)
    close = torch.tensor([[[0.0, 0.0, 0.33], [0.1, 0.0, 0.33]]], dtype=torch.float64)
    # ordered pairs: x differences -0.1 and +0.1, each coordinate difference + eps
    pairs = sum(0.1 - ((dx + 1e-6) ** 2 + 2e-12) for dx in (-0.1, 0.1))
    self_pairs = 2 * (0.1 - 3e-12)
    assert keypoint_prior_loss(close).item() == pytest.approx(pairs + self_pairs, rel=1e-12)


def test_expression_loss_is_the_mean_l1_norm():
    delta = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, -4.0]])
    assert expression_loss(delta).item() == pytest.approx((3.5 + 4.0) / 2)


def test_canonical_detector_jacobians_start_at_identity():
    from modules.canonical_keypoints import CanonicalKeypointDetector
    torch.manual_seed(0)
    detector = CanonicalKeypointDetector(num_kp=4, block_expansion=4, max_features=8,
                                         num_blocks=2, reshape_channel=32, reshape_depth=4,
                                         scale_factor=0.5, estimate_jacobian=True)
    keypoints = detector(torch.rand(2, 3, 32, 32))
    assert keypoints["value"].shape == (2, 4, 3)
    assert keypoints["value"].abs().max() <= 1
    torch.testing.assert_close(keypoints["jacobian"], torch.eye(3).expand(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"must equal the encoder's last width times"):
        CanonicalKeypointDetector(reshape_channel=1024, reshape_depth=16)
