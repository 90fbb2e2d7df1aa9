"""The conditional normalizations (modules/norms.py): SPADE and AdaIN (GADE: test_safa_components)."""
import torch

from modules.norms import SPADE, AdaIN, SPADEResBlock, parameter_free_norm


def test_parameter_free_norms_have_no_parameters():
    for kind in ("batch", "instance", "none"):
        assert not list(parameter_free_norm(4, kind).parameters())


def test_adain_sets_channel_statistics_from_the_vector():
    torch.manual_seed(0)
    layer = AdaIN(num_features=5, condition_dim=7, hidden=16)
    x = 3.0 + 2.0 * torch.randn(2, 5, 8, 8)
    vector = torch.randn(2, 7)
    out = layer(x, vector)
    gamma, beta = layer.modulation(vector)
    torch.testing.assert_close(out.mean(dim=(2, 3)), beta[..., 0, 0], atol=1e-5, rtol=1e-5)
    std = out.var(dim=(2, 3), unbiased=False).sqrt()
    torch.testing.assert_close(std, (1 + gamma[..., 0, 0]).abs(), atol=1e-3, rtol=1e-3)
    # another input with other statistics gets the same output statistics
    other = layer(-1.0 + 0.1 * torch.randn(2, 5, 8, 8), vector)
    torch.testing.assert_close(other.mean(dim=(2, 3)), out.mean(dim=(2, 3)), atol=1e-5, rtol=1e-5)


def test_spade_modulates_per_pixel_from_the_resized_map():
    torch.manual_seed(0)
    layer = SPADE(num_features=3, label_nc=2, hidden=8, norm="instance", kernel_size=1)
    x = torch.randn(1, 3, 8, 8)
    condition = torch.zeros(1, 2, 4, 4)
    condition[..., :2, :] = 1.0                     # top half of the map differs
    out = layer(x, condition)
    normalized = torch.nn.functional.instance_norm(x)
    # 1x1 convolutions: each pixel's gamma/beta depend only on the map at that pixel (nearest
    # resize: the map's top half covers the features' top 4 rows)
    ratio = (out - layer.mlp_beta(layer.mlp_shared(torch.nn.functional.interpolate(
        condition, size=(8, 8))))) / normalized
    top, bottom = ratio[..., :4, :], ratio[..., 4:, :]
    assert torch.allclose(top, top[..., :1, :1].expand_as(top), atol=1e-4)
    assert torch.allclose(bottom, bottom[..., :1, :1].expand_as(bottom), atol=1e-4)
    assert not torch.allclose(top[..., 0, 0], bottom[..., 0, 0], atol=1e-4)


def test_spade_res_block_shapes_and_spectral_norm():
    block = SPADEResBlock(4, 2, label_nc=3, spectral=True)
    out = block(torch.randn(2, 4, 8, 8), torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 2, 8, 8)
    names = dict(block.named_parameters())
    assert "conv_0.parametrizations.weight.original" in names and "conv_s.parametrizations.weight.original" in names
