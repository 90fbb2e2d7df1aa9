"""The progressive-warping generator (modules/pwm_generator.py), tiny sizes."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from flame import FLAME, FaceCodes, ensure_open_head
from modules.coords import displacement_to_flow, make_coordinate_grid
from modules.editing import FaceEdit, edit_codes
from modules.guidance import GUIDANCE_KINDS, GuidanceRenderer
from modules.pwm_generator import (ProgressiveWarpingGenerator, ProgressiveWarpingModule,
                                   warped_sources)

TINY = dict(num_levels=3, block_expansion=4, max_features=16, spade_hidden=8)


def dot_features(channels, height, width, row, col):
    features = torch.zeros(1, channels, height, width)
    features[..., row, col] = 1.0
    return features


def test_displacement_to_flow_is_the_identity_plus_the_offsets():
    displacement = torch.randn(2, 2, 5, 7)
    flow = displacement_to_flow(displacement)
    assert flow.shape == (2, 5, 7, 2)
    torch.testing.assert_close(flow - make_coordinate_grid(5, 7), displacement.permute(0, 2, 3, 1))


def test_a_known_displacement_moves_the_shortcut_feature_where_it_should():
    """D^(l) = +4 pixels of the shortcut level in x, -2 in y, given at the coarse level: the
    up-sampled flow makes each output pixel sample 4 to the right and 2 up, so a dot at (row 6,
    col 9) of F_s^(l+1) appears at (row 8, col 5)."""
    fine = 17                                                    # shortcut size; coarse: 9
    step = 2.0 / (fine - 1)                                      # one fine pixel, normalized
    displacement = torch.zeros(1, 2, 9, 9)
    displacement[:, 0], displacement[:, 1] = 4 * step, -2 * step
    shortcut = dot_features(3, fine, fine, row=6, col=9)
    modulated = torch.randn(1, 5, 9, 9)
    realigned, flow = ProgressiveWarpingModule.realign(modulated, displacement, shortcut)
    assert realigned.shape == (1, 5 + 3, fine, fine) and flow.shape == (1, 9, 9, 2)
    warped = realigned[:, 5:]
    expected = dot_features(3, fine, fine, row=8, col=5)
    torch.testing.assert_close(warped, expected, atol=1e-5, rtol=0)
    # the other route is the SPADE output, up-sampled to the shortcut's size
    torch.testing.assert_close(realigned[:, :5, ::2, ::2], modulated, atol=1e-6, rtol=0)


def test_the_initial_level_warps_with_the_geometric_displacement_or_concatenates_codes():
    displaced = ProgressiveWarpingGenerator(guidance_channels=2, displacement_guidance=True, **TINY)
    coarse = dot_features(16, 8, 8, row=3, col=5)
    step = 2.0 / 7
    guidance = torch.zeros(1, 2, 32, 32)
    guidance[:, 0] = 2 * step                                    # sample 2 coarse pixels right
    realigned, flow = displaced.initial_features(coarse, guidance)
    assert realigned.shape == (1, 32, 8, 8)                      # [warped F_s^(1), F_s^(1)]
    torch.testing.assert_close(realigned[:, :16], dot_features(16, 8, 8, row=3, col=3),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(realigned[:, 16:], coarse)
    codes_only = ProgressiveWarpingGenerator(guidance_channels=5, displacement_guidance=False,
                                             **TINY)
    codes = torch.randn(1, 5, 8, 8)
    realigned, flow = codes_only.initial_features(coarse, codes)
    assert flow is None
    torch.testing.assert_close(realigned, torch.cat([coarse, codes], 1))   # no warping


@pytest.fixture(scope="module")
def flame():
    return FLAME.from_assets(ensure_open_head(), n_shape=10, n_exp=10)


@pytest.mark.parametrize("kind", GUIDANCE_KINDS)
def test_generator_with_each_guidance(flame, kind):
    torch.manual_seed(0)
    guidance = GuidanceRenderer(flame, 32, kind, code_dim=4)
    generator = ProgressiveWarpingGenerator(
        encoder_input_channels=guidance.encoder_channels,
        guidance_channels=guidance.decoder_channels,
        displacement_guidance=guidance.displacement_channels > 0, **TINY)
    source_codes = FaceCodes.zeros(2, n_shape=10, n_exp=10, scale=8.0)
    driving_codes = edit_codes(source_codes, FaceEdit(yaw=20.0, jaw_open=10.0))
    maps = guidance(source_codes, driving_codes)
    source = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = generator(source, maps.decoder_guidance, maps.encoder_input)
    prediction = out["prediction"]
    assert prediction.shape == (2, 3, 32, 32)
    assert prediction.min() >= 0 and prediction.max() <= 1
    assert [tuple(f.shape) for f in out["level_flows"]] == [(2, 8, 8, 2), (2, 16, 16, 2)]
    assert (out["initial_flow"] is not None) == (kind in ("geom_disp", "both"))
    assert [tuple(w.shape) for w in warped_sources(source, out["level_flows"])] == [(2, 3, 32, 32)] * 2
    prediction.mean().backward()
    assert source.grad.abs().sum() > 0
    if guidance.vertex_codes is not None:                        # learned with the network
        assert guidance.vertex_codes.grad.abs().sum() > 0
    # the guidance steers the output
    with torch.no_grad():
        other = generator(source, guidance(source_codes, source_codes).decoder_guidance,
                          maps.encoder_input)["prediction"]
    assert not torch.allclose(other, prediction)


def test_every_convolution_is_spectrally_normalized():
    generator = ProgressiveWarpingGenerator(encoder_input_channels=3, guidance_channels=3,
                                            displacement_guidance=False, **TINY)
    convs = [m for m in generator.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) >= 10
    assert all(parametrize.is_parametrized(conv, "weight") for conv in convs)
    plain = ProgressiveWarpingGenerator(spectral=False, **TINY)
    assert not any(parametrize.is_parametrized(m, "weight") for m in plain.modules()
                   if isinstance(m, nn.Conv2d))


def test_default_levels_and_channels():
    """Authors' code: 6 levels, 32 ... 1024 channels, 5 displacement-estimating PWMs."""
    generator = ProgressiveWarpingGenerator(spectral=False)
    assert generator.channels == [32, 64, 128, 256, 512, 1024]
    assert len(generator.levels) == 5


def test_bad_inputs_are_named():
    generator = ProgressiveWarpingGenerator(encoder_input_channels=4, guidance_channels=6, **TINY)
    source, guidance, extra = torch.rand(1, 3, 32, 32), torch.rand(1, 6, 32, 32), torch.rand(1, 4, 32, 32)
    with pytest.raises(ValueError, match="pass encoder_input"):
        generator(source, guidance)
    with pytest.raises(ValueError, match=r"guidance must be B x 6 x H x W"):
        generator(source, guidance[:, :2], extra)
    with pytest.raises(ValueError, match="divisible by 2\\^\\(num_levels - 1\\) = 4"):
        generator(torch.rand(1, 3, 30, 30), guidance, extra)
    with pytest.raises(ValueError, match="2 displacement channels"):
        ProgressiveWarpingGenerator(guidance_channels=1, displacement_guidance=True)


@torch.no_grad()
def test_cached_source_features_give_the_same_frames(flame):
    """The encoder pyramid and the source render computed once per source (inference) give the
    frames that recomputing them gives."""
    torch.manual_seed(0)
    guidance = GuidanceRenderer(flame, 32, "both", code_dim=4)
    generator = ProgressiveWarpingGenerator(
        encoder_input_channels=guidance.encoder_channels,
        guidance_channels=guidance.decoder_channels, **TINY).eval()
    source_codes = FaceCodes.zeros(2, n_shape=10, n_exp=10, scale=8.0)
    driving_codes = edit_codes(source_codes, FaceEdit(yaw=15.0))
    source = torch.rand(2, 3, 32, 32)
    maps = guidance(source_codes, driving_codes)
    cached_input = guidance.encoder_input(source_codes)
    torch.testing.assert_close(cached_input, maps.encoder_input)
    skipped = guidance(source_codes, driving_codes, render_source=False)
    assert skipped.encoder_input is None
    torch.testing.assert_close(skipped.decoder_guidance, maps.decoder_guidance)
    features = generator.encode(source, cached_input)
    torch.testing.assert_close(
        generator(source, skipped.decoder_guidance, source_features=features)["prediction"],
        generator(source, maps.decoder_guidance, maps.encoder_input)["prediction"])
    with pytest.raises(ValueError, match="source_features must hold the 3 levels"):
        generator(source, maps.decoder_guidance, source_features=features[:2])
