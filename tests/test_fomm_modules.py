"""Shared FOMM-style modules (util, blocks, keypoints, dense motion, generator, discriminator) at
tiny sizes on CPU. The objectives are tested in test_objectives.py, the models by the contract
test (test_model_contract.py)."""
import pytest
import torch
from torch import nn

from modules import blocks
from modules.coords import make_coordinate_grid
from modules.dense_motion import DenseMotionNetwork, ExtraMotion
from modules.discriminator import MultiScaleDiscriminator
from modules.generator import OcclusionAwareGenerator
from modules.keypoint_detector import KPDetector
from modules.util import (AntiAliasDownsample, ImagePyramid, RandomTransform, colorize_masks,
                          draw_keypoints, kp2gaussian, relative_keypoints, sparse_affine_flows)

SIZE = 64
NUM_KP = 4


# ----------------------------------------------------------------------------- helpers
def random_keypoints(batch=2, num_kp=NUM_KP, jacobian=True):
    kp = {"value": torch.rand(batch, num_kp, 2) * 1.6 - 0.8}
    if jacobian:
        kp["jacobian"] = torch.eye(2) + 0.2 * torch.randn(batch, num_kp, 2, 2)
    return kp


def blob_images(centers, colors, size):
    """Smooth test images: a colored gaussian blob on grey, one per (center, color)."""
    grid = make_coordinate_grid(size, size)
    images = []
    for (cx, cy), color in zip(centers, colors):
        blob = torch.exp(-((grid[..., 0] - cx) ** 2 + (grid[..., 1] - cy) ** 2) / 0.1)
        images.append(torch.stack([0.2 + 0.7 * blob * c for c in color]))
    return torch.stack(images)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- blocks
def test_blocks_shapes():
    x = torch.rand(2, 4, 16, 16)
    assert blocks.SameBlock2d(4, 6)(x).shape == (2, 6, 16, 16)
    assert blocks.DownBlock2d(4, 6)(x).shape == (2, 6, 8, 8)
    assert blocks.UpBlock2d(4, 6)(x).shape == (2, 6, 32, 32)
    assert blocks.ResBlock2d(4)(x).shape == x.shape
    encoder = blocks.Encoder(8, 4, num_blocks=3, max_features=16)
    assert [f.shape[1] for f in encoder(x)] == [4, 16, 16, 16]
    hourglass = blocks.Hourglass(8, 4, num_blocks=3, max_features=16)
    assert hourglass(x).shape == (2, hourglass.out_filters, 16, 16)
    assert hourglass.out_filters == 8 + 4


def test_norm_factory_and_sync_batchnorm_conversion():
    assert isinstance(blocks.make_norm(4, "batch"), nn.BatchNorm2d)
    assert blocks.make_norm(4, "batch").affine
    assert isinstance(blocks.make_norm(4, "instance"), nn.InstanceNorm2d)
    assert isinstance(blocks.make_norm(4, "none"), nn.Identity)
    with pytest.raises(ValueError, match="unknown norm"):
        blocks.make_norm(4, "group")
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(blocks.Hourglass(8, 3, 2, 16))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())


# ----------------------------------------------------------------------------- util
def test_kp2gaussian_peaks_at_keypoint():
    kp = torch.tensor([[[-1.0, -1.0], [1.0 / 3, -1.0 / 3]]])     # pixel centres of a 7x7 grid
    heatmaps = kp2gaussian(kp, (7, 7), variance=0.01)
    assert heatmaps.shape == (1, 2, 7, 7)
    assert heatmaps[0, 0, 0, 0] == pytest.approx(1.0)
    assert heatmaps[0, 1, 2, 4] == pytest.approx(1.0)
    assert heatmaps[0, 1].argmax() == 2 * 7 + 4


def test_sparse_affine_flows_follow_eq9():
    kp_driving, kp_source = random_keypoints(), random_keypoints()
    flows = sparse_affine_flows(kp_driving, kp_source, (9, 9))
    assert flows.shape == (2, NUM_KP, 9, 9, 2)
    # at z = p_D the motion lands exactly on p_S; one pixel step moves by J_S J_D^-1 step
    grid = make_coordinate_grid(9, 9)
    z = grid[3, 5]
    expected = kp_source["value"] + torch.einsum(
        "bkij,bkj->bki", kp_source["jacobian"] @ torch.linalg.inv(kp_driving["jacobian"]),
        z - kp_driving["value"])
    assert torch.allclose(flows[:, :, 3, 5], expected, atol=1e-5)


def test_relative_keypoints_identity_when_driving_is_reference():
    kp_source, kp_driving = random_keypoints(), random_keypoints()
    for adapt in (False, True):
        result = relative_keypoints(kp_source, kp_driving, kp_driving, adapt_movement_scale=adapt)
        assert torch.allclose(result["value"], kp_source["value"], atol=1e-5)
        assert torch.allclose(result["jacobian"], kp_source["jacobian"], atol=1e-5)


def test_relative_keypoints_movement_and_scale():
    kp_reference = {"value": torch.tensor([[[0.0, 0.0], [0.2, 0.0], [0.0, 0.2]]])}
    kp_source = {"value": kp_reference["value"] * 2}            # 4x the hull area
    kp_driving = {"value": kp_reference["value"] + 0.1}
    plain = relative_keypoints(kp_source, kp_driving, kp_reference)
    assert torch.allclose(plain["value"], kp_source["value"] + 0.1)
    adapted = relative_keypoints(kp_source, kp_driving, kp_reference, adapt_movement_scale=True)
    assert torch.allclose(adapted["value"], kp_source["value"] + 0.2, atol=1e-6)


def test_relative_jacobian_reproduces_eq21():
    kp_source, kp_driving, kp_reference = random_keypoints(), random_keypoints(), random_keypoints()
    result = relative_keypoints(kp_source, kp_driving, kp_reference)
    flows = sparse_affine_flows(result, kp_source, (5, 5))
    z = make_coordinate_grid(5, 5)[1, 2]
    linear = kp_reference["jacobian"] @ torch.linalg.inv(kp_driving["jacobian"])
    offset = z - kp_source["value"] + kp_reference["value"] - kp_driving["value"]
    expected = kp_source["value"] + torch.einsum("bkij,bkj->bki", linear, offset)
    assert torch.allclose(flows[:, :, 1, 2], expected, atol=1e-5)


def test_random_transform_image_and_coordinates_agree():
    """Sampling an image of its own pixel coordinates at T(z) gives T(z) back (pixel centres at
    +-1); under the reference convention (-1, +1 = outer pixel edges) it gives T(z) W / (W - 1),
    the hand-computed half-pixel stretch of that convention."""
    size = 33
    grid = make_coordinate_grid(size, size)
    coordinate_image = grid.permute(2, 0, 1)[None].repeat(2, 1, 1, 1)   # pixel (x, y) -> (x, y)
    for align_corners, stretch in ((True, 1.0), (False, size / (size - 1))):
        torch.manual_seed(0)
        transform = RandomTransform(2, sigma_affine=0.05, sigma_tps=0.005, points_tps=5,
                                    align_corners=align_corners)
        warped = transform.transform_image(coordinate_image)            # pixel z -> T(z)
        mapped = transform.transform_coordinates(grid[None].expand(2, -1, -1, -1))
        inside = (mapped.abs() < 0.9).all(-1)
        assert inside.float().mean() > 0.5
        difference = (warped.permute(0, 2, 3, 1) - mapped * stretch).norm(dim=-1)
        assert difference[inside].max() < 1e-4


def test_random_transform_reference_layout_and_seeded_draws():
    """The reference layout: affine noise B x 2 x 3 then one TPS weight per control point
    (B x 1 x P, added to x and y alike), drawn in that order from the global generator, with the
    L1-distance kernel r^2 log(r + 1e-6) (checked by hand at one point)."""
    torch.manual_seed(3)
    noise, weights = torch.randn(2, 2, 3) * 0.05, torch.randn(2, 1, 25) * 0.005
    torch.manual_seed(3)
    transform = RandomTransform(2)
    assert torch.equal(transform.affine, torch.eye(2, 3) + noise)
    assert torch.equal(transform.control_weights, weights.transpose(1, 2))
    point = torch.tensor([0.3, -0.2])
    distance = (point - transform.control_points).abs().sum(-1)                 # P
    bend = (distance ** 2 * torch.log(distance + 1e-6) * weights[:, 0]).sum(-1)  # B
    expected = point @ transform.affine[:, :, :2].transpose(1, 2) + transform.affine[:, :, 2]
    expected = expected + bend[:, None]
    mapped = transform.transform_coordinates(point.expand(2, 1, 2))[:, 0]
    assert torch.allclose(mapped, expected, atol=1e-6)
    euclidean = RandomTransform(2, tps_kernel="euclidean")
    assert euclidean.control_weights.shape == (2, 25, 2)
    replay = RandomTransform.from_parameters(transform.affine, transform.control_points,
                                             weights)
    assert torch.equal(replay.transform_coordinates(point.expand(2, 1, 2)),
                       transform.transform_coordinates(point.expand(2, 1, 2)))
    with pytest.raises(ValueError, match="tps_kernel"):
        RandomTransform(2, tps_kernel="radial")


def test_random_transform_jacobian_matches_finite_differences():
    for tps_kernel in ("reference", "euclidean"):
        check_transform_jacobian(RandomTransform(2, sigma_affine=0.1, sigma_tps=0.05, points_tps=3,
                                                 tps_kernel=tps_kernel))


def check_transform_jacobian(transform):
    points = torch.rand(2, 6, 2, dtype=torch.float64) - 0.5
    transform.affine = transform.affine.double()
    transform.control_weights = transform.control_weights.double()
    jacobian = transform.jacobian(points)
    eps = 1e-6
    for axis in range(2):
        step = torch.zeros(2, dtype=torch.float64)
        step[axis] = eps
        column = (transform.transform_coordinates(points + step)
                  - transform.transform_coordinates(points - step)) / (2 * eps)
        assert torch.allclose(jacobian[..., :, axis], column, atol=1e-6)


def test_antialias_downsample_and_pyramid():
    down = AntiAliasDownsample(0.25)
    assert down.weight.shape == (3, 1, 13, 13) and "weight" in down.state_dict()
    assert torch.allclose(down.weight.sum(dim=(1, 2, 3)), torch.ones(3))
    constant = torch.full((1, 2, 32, 32), 0.7)          # any channel count
    shrunk = down(constant)
    assert shrunk.shape == (1, 2, 8, 8)
    # reference method: zero padding darkens the border; output pixels 2..6 (input 8..24, the
    # 13-tap kernel inside the image) keep the value; output pixel i is blurred input pixel 4 i
    assert torch.allclose(shrunk[..., 2:7, 2:7], constant[..., :5, :5], atol=1e-5)
    assert shrunk[0, 0, 0, 0] < 0.5
    noise = torch.rand(1, 1, 64, 64)
    blurred = down.blur(noise)
    assert torch.equal(down(noise), blurred[..., ::4, ::4])
    assert down(noise).std() < noise.std() / 2                      # high frequencies removed
    bilinear = AntiAliasDownsample(0.25, method="replicate_bilinear")
    assert torch.allclose(bilinear(constant), constant[..., :8, :8], atol=1e-6)
    assert bilinear(noise).std() < noise.std() / 2
    assert "weight" not in AntiAliasDownsample(0.5, persistent=False).state_dict()
    with pytest.raises(ValueError, match="method"):
        AntiAliasDownsample(0.5, method="area")
    pyramid = ImagePyramid([1, 0.5, 0.25])
    assert len(pyramid.state_dict()) == 0
    levels = pyramid(torch.rand(2, 3, 32, 32))
    assert {s: tuple(x.shape[-2:]) for s, x in levels.items()} == {
        1.0: (32, 32), 0.5: (16, 16), 0.25: (8, 8)}


def test_visual_helpers():
    images = torch.zeros(2, 3, 16, 16)
    drawn = draw_keypoints(images, torch.zeros(2, 3, 2), radius=2)
    assert drawn.shape == images.shape and drawn[:, :, 7:9, 7:9].sum() > 0
    masks = torch.softmax(torch.rand(2, 5, 4, 4), dim=1)
    assert colorize_masks(masks, (16, 16)).shape == (2, 3, 16, 16)


# ----------------------------------------------------------------------------- keypoints
def test_keypoint_detector_shapes_and_identity_jacobians():
    detector = KPDetector(NUM_KP, 3, block_expansion=8, max_features=32, num_blocks=2,
                          temperature=0.1, scale_factor=0.25)
    kp = detector(torch.rand(2, 3, SIZE, SIZE))
    assert kp["value"].shape == (2, NUM_KP, 2)
    assert kp["jacobian"].shape == (2, NUM_KP, 2, 2)
    assert kp["value"].abs().max() <= 1
    assert torch.allclose(kp["jacobian"], torch.eye(2).expand(2, NUM_KP, 2, 2), atol=1e-5)
    no_jacobian = KPDetector(NUM_KP, 3, 8, 32, 2, estimate_jacobian=False)
    assert set(no_jacobian(torch.rand(1, 3, 32, 32))) == {"value"}


# ----------------------------------------------------------------------------- dense motion
def tiny_dense_motion(**kwargs):
    params = dict(num_kp=NUM_KP, num_channels=3, block_expansion=8, max_features=32,
                  num_blocks=2, scale_factor=0.25)
    params.update(kwargs)
    return DenseMotionNetwork(**params)


def test_dense_motion_shapes_and_masks_sum_to_one():
    network = tiny_dense_motion()
    out = network(torch.rand(2, 3, SIZE, SIZE), random_keypoints(), random_keypoints())
    assert out["deformation"].shape == (2, 16, 16, 2)
    assert out["mask"].shape == (2, NUM_KP + 1, 16, 16)
    assert out["sparse_deformed"].shape == (2, NUM_KP + 1, 3, 16, 16)
    assert out["occlusion_map"].shape == (2, 1, 16, 16)
    assert torch.allclose(out["mask"].sum(1), torch.ones(2, 16, 16), atol=1e-5)
    assert 0 <= out["occlusion_map"].min() and out["occlusion_map"].max() <= 1


def test_identical_keypoints_give_identity_flows():
    network = tiny_dense_motion()
    kp = random_keypoints()
    out = network(torch.rand(2, 3, SIZE, SIZE), kp, kp)
    identity = make_coordinate_grid(16, 16).expand(2, NUM_KP + 1, 16, 16, 2)
    assert torch.allclose(out["sparse_flows"], identity, atol=1e-5)
    assert torch.allclose(out["deformation"], identity[:, 0], atol=1e-5)
    assert out["heatmaps"].abs().max() < 1e-6                     # H_k = 0 when nothing moves


def test_dense_motion_takes_extra_motions_and_several_occlusion_maps():
    """SAFA's case: one extra (3D) motion slot, two occlusion maps (O_g, O_ca)."""
    network = tiny_dense_motion(num_extra_motions=1, num_occlusion_maps=2,
                                downsample_method="replicate_bilinear")
    source = torch.rand(2, 3, SIZE, SIZE)
    shift = torch.tensor([0.1, 0.0])
    flow_3d = make_coordinate_grid(SIZE, SIZE)[None].repeat(2, 1, 1, 1) + shift
    extra = ExtraMotion(flow=flow_3d, heatmap=torch.rand(2, 1, SIZE, SIZE),
                        deformed=torch.rand(2, 3, SIZE, SIZE))
    out = network(source, random_keypoints(), random_keypoints(), extra_motions=[extra])
    assert out["mask"].shape == (2, NUM_KP + 2, 16, 16)
    assert out["occlusion_maps"].shape == (2, 2, 16, 16)
    assert torch.allclose(out["mask"].sum(1), torch.ones(2, 16, 16), atol=1e-5)
    expected_flow = make_coordinate_grid(16, 16) + shift
    assert torch.allclose(out["sparse_flows"][:, -1], expected_flow.expand(2, -1, -1, -1),
                          atol=1e-5)
    # the reference's zero-padded shrinking keeps the displacement inside, fades it at the border
    reference = tiny_dense_motion(num_extra_motions=1, num_occlusion_maps=2)
    flows = reference(source, random_keypoints(), random_keypoints(),
                      extra_motions=[extra])["sparse_flows"][:, -1]
    assert torch.allclose(flows[:, 2:-2, 2:-2], expected_flow[2:-2, 2:-2].expand(2, -1, -1, -1),
                          atol=1e-5)
    assert (flows - make_coordinate_grid(16, 16))[:, 0, 0, 0].max() < 0.05
    # without a deformed image the source is warped by the extra flow
    out = network(source, random_keypoints(), random_keypoints(),
                  extra_motions=[ExtraMotion(flow=flow_3d, heatmap=torch.rand(2, SIZE, SIZE))])
    assert out["sparse_deformed"].shape == (2, NUM_KP + 2, 3, 16, 16)
    with pytest.raises(ValueError, match="num_extra_motions"):
        network(source, random_keypoints(), random_keypoints())


# ----------------------------------------------------------------------------- generator
def tiny_generator(**kwargs):
    dense = dict(block_expansion=8, max_features=32, num_blocks=2, scale_factor=0.25)
    dense.update(kwargs.pop("dense_motion_params", {}))
    return OcclusionAwareGenerator(3, NUM_KP, block_expansion=8, max_features=32,
                                   num_down_blocks=2, num_bottleneck_blocks=1,
                                   dense_motion_params=dense, **kwargs)


def test_generator_outputs():
    generator = tiny_generator()
    out = generator(torch.rand(2, 3, SIZE, SIZE), random_keypoints(), random_keypoints())
    assert out["prediction"].shape == (2, 3, SIZE, SIZE)
    assert 0 <= out["prediction"].min() and out["prediction"].max() <= 1
    assert out["deformed"].shape == (2, 3, SIZE, SIZE)
    assert out["occlusion_map"].shape == (2, 1, 16, 16)
    assert out["mask"].shape == (2, NUM_KP + 1, 16, 16)
    assert out["sparse_deformed"].shape == (2, NUM_KP + 1, 3, 16, 16)
    assert out["deformation"].shape == (2, 16, 16, 2)


def test_generator_steps_compose_to_forward_with_skips_and_extras():
    """The encode / warp / bottleneck / decode split SAFA builds on (U-Net skips, extra motion)."""
    generator = tiny_generator(skip_connections=True,
                               dense_motion_params={"num_extra_motions": 1,
                                                    "num_occlusion_maps": 2}).eval()
    source = torch.rand(2, 3, SIZE, SIZE)
    kp_driving, kp_source = random_keypoints(), random_keypoints()
    extra = [ExtraMotion(flow=make_coordinate_grid(SIZE, SIZE).expand(2, -1, -1, -1),
                         heatmap=torch.zeros(2, 1, SIZE, SIZE))]
    full = generator(source, kp_driving, kp_source, extra)
    motion = generator.estimate_motion(source, kp_driving, kp_source, extra)
    features = generator.encode(source)
    assert [f.shape[-1] for f in features] == [SIZE, SIZE // 2, SIZE // 4]
    warped = generator.warp_features(features, motion)
    prediction = generator.decode(generator.bottleneck(warped[-1]), warped[:-1])
    assert torch.allclose(prediction, full["prediction"], atol=1e-6)
    assert full["occlusion_maps"].shape == (2, 2, 16, 16)


def test_generator_identity_motion_warps_nothing():
    """With pixel-centre sampling the identity flow is exactly the identity; the reference
    convention samples the identity grid half a pixel outwards at the border (a slight zoom)."""
    generator = tiny_generator(align_corners=True)
    source = torch.rand(1, 3, SIZE, SIZE)
    features = generator.encode(source)
    identity = make_coordinate_grid(SIZE // 4, SIZE // 4)[None]
    assert torch.allclose(generator.warp_feature(features[-1], identity), features[-1], atol=1e-5)
    assert generator.dense_motion_network.align_corners is True
    reference = tiny_generator()
    assert reference.align_corners is False
    assert reference.dense_motion_network.align_corners is False
    zoomed = reference.warp_feature(features[-1], identity)
    # by hand: grid coordinate i lands on pixel position p = i W / (W - 1) - 1/2 (zero outside)
    feature, width = features[-1][0], SIZE // 4
    assert torch.allclose(zoomed[0, :, 0, 0], 0.25 * feature[:, 0, 0], atol=1e-6)
    p = 7 * width / (width - 1) - 0.5                                  # between pixels 6 and 7
    w7 = p - 6
    row = (1 - w7) * feature[:, :, 6] + w7 * feature[:, :, 7]          # x interpolated, all y
    expected = (1 - w7) * row[:, 6] + w7 * row[:, 7]
    assert torch.allclose(zoomed[0, :, 7, 7], expected, atol=1e-5)


# ----------------------------------------------------------------------------- discriminator
def test_multiscale_discriminator_outputs():
    discriminator = MultiScaleDiscriminator(scales=[1, 0.5], num_channels=3, block_expansion=8,
                                            num_blocks=3, max_features=32, use_spectral_norm=True,
                                            use_kp=True, num_kp=NUM_KP)
    out = discriminator(torch.rand(2, 3, SIZE, SIZE), random_keypoints())
    assert set(out) == {1.0, 0.5}
    assert len(out[1.0]["features"]) == 3
    assert out[1.0]["prediction"].shape[:2] == (2, 1)
    assert out[0.5]["prediction"].shape[-1] < out[1.0]["prediction"].shape[-1]
    with pytest.raises(ValueError, match="use_kp"):
        discriminator(torch.rand(2, 3, SIZE, SIZE))
