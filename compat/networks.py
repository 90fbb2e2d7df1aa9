"""Our networks built from our ``model_params``, network by network, for checkpoint conversion.

The converter checks a mapped checkpoint against the state dicts of the very networks a model
builds from the same ``model_params``. These builders wire the sections the way the ``fomm``,
``safa`` and ``tdmm`` models do; ``device="meta"`` builds them without allocating memory (only
names and shapes are needed), so even full-size networks take milliseconds.
"""
from collections import OrderedDict

import torch

from modules.discriminator import MultiScaleDiscriminator
from modules.generator import OcclusionAwareGenerator
from modules.keypoint_detector import KPDetector
from modules.safa_generator import SAFAGenerator
from modules.tdmm_encoder import TDMMEncoder

# contextual-attention settings that are not ContextualAttention arguments
MODULE_ATTENTION_KEYS = ("dilations",)


def kp_detector(model_params):
    common = model_params["common_params"]
    return KPDetector(num_kp=common["num_kp"], num_channels=common["num_channels"],
                      estimate_jacobian=common["estimate_jacobian"],
                      **model_params["kp_detector_params"])


def fomm_generator(model_params):
    common = model_params["common_params"]
    return OcclusionAwareGenerator(num_channels=common["num_channels"], num_kp=common["num_kp"],
                                   **model_params["generator_params"])


def safa_generator(model_params):
    common, safa = model_params["common_params"], model_params["safa_params"]
    generator_params = dict(model_params["generator_params"])
    generator_params.pop("skip_connections", None)        # safa_params decides
    attention = dict(safa["contextual_attention"])
    dilations = tuple(attention.pop("dilations", (1, 2, 4, 8)))
    flame, tdmm = model_params.get("flame_params", {}), model_params.get("tdmm_params", {})
    condition_dim = 1280 if safa.get("gade_condition") == "feature" else \
        flame.get("n_shape", 100) + flame.get("n_exp", 50) + tdmm.get("n_pose", 6) + 3
    return SAFAGenerator(
        num_channels=common["num_channels"], num_kp=common["num_kp"],
        use_3d_motion=safa["use_3d_motion"],
        use_contextual_attention=safa["use_contextual_attention"],
        use_gade=safa["use_gade"], condition_dim=condition_dim,
        gade_params={"norm": safa.get("gade_norm", "batch")},
        contextual_attention_params={"dilations": dilations, **attention},
        skip_connections=safa.get("skip_connections", True),
        decoder_gade=safa.get("decoder_gade", False),
        heatmap_3d=safa.get("heatmap_3d", "driving_minus_source"), **generator_params)


def discriminator(model_params):
    common = model_params["common_params"]
    return MultiScaleDiscriminator(num_channels=common["num_channels"], num_kp=common["num_kp"],
                                   **model_params["discriminator_params"])


def tdmm_encoder(model_params):
    flame, tdmm = model_params.get("flame_params", {}), model_params.get("tdmm_params", {})
    return TDMMEncoder(n_shape=flame.get("n_shape", 100), n_exp=flame.get("n_exp", 50),
                       n_pose=tdmm.get("n_pose", 6), imagenet=False, allow_random_init=True)


BUILDERS = {
    "fomm": (("kp_detector", kp_detector), ("generator", fomm_generator),
             ("discriminator", discriminator)),
    "safa": (("kp_detector", kp_detector), ("generator", safa_generator),
             ("discriminator", discriminator), ("tdmm", tdmm_encoder)),
    "tdmm": (("tdmm", tdmm_encoder),),
}


def build_networks(model, model_params, device=None):
    """``{network name: module}`` of ``model`` ('fomm', 'safa', 'tdmm') from our model_params."""
    if model not in BUILDERS:
        raise ValueError(f"no network builders for model {model!r}; expected one of "
                         f"{sorted(BUILDERS)}")
    with torch.device(device or "cpu"):
        return OrderedDict((name, build(model_params)) for name, build in BUILDERS[model]
                           if name != "discriminator" or "discriminator_params" in model_params)


__all__ = ["build_networks", "kp_detector", "fomm_generator", "safa_generator", "discriminator",
           "tdmm_encoder"]
