"""Checkpoints of the public face-vid2vid re-implementation -> this framework's networks.

A reference checkpoint (``Logger.save_cpk``) is a dict with one state dict per network:
``kp_detector``, ``he_estimator``, ``generator`` (either generator class: the SPADE one has
``decoder.*`` entries), ``discriminator`` (optional), optimizers and ``epoch``. This module

- recognizes such a checkpoint (:func:`is_facevid2vid_checkpoint`);
- renames every entry to this framework's module layout (:data:`NETWORK_PREFIXES` + the
  network's own key): ``modules/canonical_keypoints.py``, ``modules/head_pose.py``,
  ``modules/generator_3d.py`` and ``modules/discriminator.py``;
- checks the result key for key and shape for shape against the networks built from the
  reference's ``model_params`` (:data:`VOX_256_MODEL_PARAMS` by default), built on the meta
  device so that the check allocates nothing. A mismatch names the first missing or unexpected
  key.

Renames: ``down_blocks.down<i>`` -> ``down_blocks.<i>`` (and ``up<i>``), ``b<n>_<i>`` ->
``<i>``, ``3dr<i>``/``2dr<i>`` -> ``<i>``, the original decoder's ``resblocks_2d``/``up_blocks``/
``final`` -> ``decoder.*``, SPADE's ``G_middle_<i>`` -> ``decoder.middle_blocks.<i>`` and
``up_<i>`` -> ``decoder.up_blocks.<i>``, the discriminator's ``discs.<scale>`` ->
``discriminators.<index>``, old-style spectral norm (``weight_orig``/``weight_u``/``weight_v``)
-> ``parametrizations.weight.{original, 0._u, 0._v}``, and the head-pose estimator's
``fc_roll`` <-> ``fc_yaw`` (the reference's yaw head is named ``fc_roll``, its roll head
``fc_yaw``). BatchNorm ``num_batches_tracked`` entries missing from old checkpoints are filled
with 0.
"""
import copy
import re

import torch

# Where each network's entries go in the converted state dict (one place to rename): the
# ``facevid2vid`` model's layout (modules/models/facevid2vid.py; its discriminator lives in its
# adversarial objective).
NETWORK_PREFIXES = {
    "kp_detector": "kp_detector.",
    "he_estimator": "he_estimator.",
    "generator": "generator.",
    "discriminator": "adversarial.discriminator.",
}
REQUIRED_NETWORKS = ("kp_detector", "he_estimator", "generator")

# model_params of the reference's config/vox-256.yaml (its released Vox-256 models)
VOX_256_MODEL_PARAMS = {
    "common_params": {"num_kp": 15, "image_channel": 3, "feature_channel": 32,
                      "estimate_jacobian": False},
    "kp_detector_params": {"temperature": 0.1, "block_expansion": 32, "max_features": 1024,
                           "scale_factor": 0.25, "num_blocks": 5, "reshape_channel": 16384,
                           "reshape_depth": 16},
    "he_estimator_params": {"block_expansion": 64, "max_features": 2048, "num_bins": 66},
    "generator_params": {"block_expansion": 64, "max_features": 512, "num_down_blocks": 2,
                         "reshape_channel": 32, "reshape_depth": 16, "num_resblocks": 6,
                         "estimate_occlusion_map": True,
                         "dense_motion_params": {"block_expansion": 32, "max_features": 1024,
                                                 "num_blocks": 5, "reshape_depth": 16,
                                                 "compress": 4}},
    "discriminator_params": {"scales": [1], "block_expansion": 32, "max_features": 512,
                             "num_blocks": 4, "sn": True},
}

SPECTRAL_SUFFIXES = ((r"\.weight_orig$", ".parametrizations.weight.original"),
                     (r"\.weight_u$", ".parametrizations.weight.0._u"),
                     (r"\.weight_v$", ".parametrizations.weight.0._v"))

# (pattern, replacement): the first matching rule renames a key; unmatched keys keep their name.
STRUCTURE_RULES = {
    "kp_detector": ((r"^predictor\.down_blocks\.down(\d+)\.", r"predictor.down_blocks.\1."),
                    (r"^predictor\.up_blocks\.up(\d+)\.", r"predictor.up_blocks.\1.")),
    "he_estimator": ((r"^block(\d)\.b\d_(\d+)\.", r"block\1.\2."),
                     (r"^fc_roll\.", "fc_yaw."),
                     (r"^fc_yaw\.", "fc_roll.")),
    "generator": ((r"^resblocks_3d\.3dr(\d+)\.", r"resblocks_3d.\1."),
                  (r"^resblocks_2d\.2dr(\d+)\.", r"decoder.resblocks.\1."),
                  (r"^up_blocks\.", "decoder.up_blocks."),
                  (r"^final\.", "decoder.final."),
                  (r"^decoder\.G_middle_(\d+)\.", r"decoder.middle_blocks.\1."),
                  (r"^decoder\.up_(\d+)\.", r"decoder.up_blocks.\1.")),
}


# ----------------------------------------------------------------------------- recognition
def is_facevid2vid_checkpoint(state):
    """True for a reference face-vid2vid checkpoint dict: the three inference networks present,
    and a keypoint detector with a 3D heatmap head (``kp.weight`` of 5 dimensions)."""
    if not isinstance(state, dict) or not all(isinstance(state.get(name), dict)
                                              for name in REQUIRED_NETWORKS):
        return False
    kp_weight = state["kp_detector"].get("kp.weight")
    return torch.is_tensor(kp_weight) and kp_weight.dim() == 5


def generator_decoder(generator_state):
    """'spade' for ``OcclusionAwareSPADEGenerator`` states (``decoder.*`` entries), else
    'original'."""
    return "spade" if any(key.startswith("decoder.") for key in generator_state) else "original"


# ----------------------------------------------------------------------------- renaming
def rename_key(network, key, scales=(1,)):
    """A reference entry's name in this framework's module of ``network``."""
    if network == "discriminator":
        key = rename_discriminator_key(key, scales)
    for pattern, replacement in STRUCTURE_RULES.get(network, ()):
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            key = renamed
            break
    if network != "discriminator":   # ours keeps the reference's spectral-norm hook layout
        for pattern, replacement in SPECTRAL_SUFFIXES:
            key = re.sub(pattern, replacement, key)
    return key


def scale_name(scale):
    """The reference's module name of a discriminator scale (``0.5`` -> ``'0-5'``; ``1`` and
    ``1.0`` -> ``'1'``, as the reference's YAML writes it)."""
    value = float(scale)
    return (str(int(value)) if value.is_integer() else str(value)).replace(".", "-")


def rename_discriminator_key(key, scales):
    match = re.match(r"^discs\.([^.]+)\.(down_blocks|conv)\.(.*)$", key)
    if match is None:
        raise KeyError(f"unexpected discriminator entry {key!r}: expected discs.<scale>.*")
    names = [scale_name(scale) for scale in scales]
    if match.group(1) not in names:
        raise KeyError(f"discriminator entry {key!r} is for scale {match.group(1)!r}, not one of "
                       f"the configured scales {list(scales)}")
    index = names.index(match.group(1))
    part = "blocks" if match.group(2) == "down_blocks" else "head"
    return f"discriminators.{index}.{part}.{match.group(3)}"


def rename_state(network, state, scales=(1,)):
    return {rename_key(network, key, scales): value for key, value in state.items()}


# ----------------------------------------------------------------------------- networks
def network_arguments(model_params, decoder="original"):
    """Constructor keyword arguments of this framework's networks from a reference
    ``model_params`` section (``common_params``, ``kp_detector_params``, ``he_estimator_params``,
    ``generator_params``, ``discriminator_params``)."""
    common = model_params["common_params"]
    kp_params = model_params["kp_detector_params"]
    he_params = model_params["he_estimator_params"]
    generator_params = dict(model_params["generator_params"])
    disc_params = dict(model_params.get("discriminator_params", {}))
    shared = {"num_kp": common["num_kp"], "image_channel": common["image_channel"]}
    he_arguments = {**shared, "block_expansion": he_params["block_expansion"],
                    "num_bins": he_params["num_bins"]}
    if "widths" in he_params:          # our option; the reference's widths are fixed
        he_arguments["widths"] = tuple(he_params["widths"])
    return {
        "kp_detector": {**shared, **kp_params,
                        "estimate_jacobian": common.get("estimate_jacobian", False)},
        "he_estimator": he_arguments,
        "generator": {**shared, "feature_channel": common["feature_channel"],
                      **generator_params, "decoder": decoder},
        "discriminator": {"scales": disc_params.get("scales", [1]),
                          "num_channels": common["image_channel"],
                          "block_expansion": disc_params.get("block_expansion", 32),
                          "max_features": disc_params.get("max_features", 512),
                          "num_blocks": disc_params.get("num_blocks", 4),
                          "use_spectral_norm": disc_params.get("sn", False)},
    }


def build_network(network, arguments):
    """This framework's module for ``network`` ('kp_detector', 'he_estimator', 'generator',
    'discriminator') from :func:`network_arguments`' entry."""
    from modules.canonical_keypoints import CanonicalKeypointDetector
    from modules.discriminator import MultiScaleDiscriminator
    from modules.generator_3d import OcclusionAwareGenerator3d
    from modules.head_pose import HeadPoseEstimator

    classes = {"kp_detector": CanonicalKeypointDetector, "he_estimator": HeadPoseEstimator,
               "generator": OcclusionAwareGenerator3d, "discriminator": MultiScaleDiscriminator}
    return classes[network](**copy.deepcopy(arguments))


def expected_shapes(network, arguments):
    """``{key: shape}`` of the network's state dict, built on the meta device (no memory)."""
    with torch.device("meta"):
        module = build_network(network, arguments)
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


# ----------------------------------------------------------------------------- model_params
def model_params_from_reference(model_params, decoder="original"):
    """The ``facevid2vid`` model's ``model_params`` (our layout) from a reference
    ``model_params`` section (``he_estimator_params.widths`` may be given for non-reference
    widths; the reference's ``max_features`` of the estimator is unused there too)."""
    arguments = network_arguments(model_params, decoder)
    common = model_params["common_params"]
    kp = {k: v for k, v in arguments["kp_detector"].items()
          if k not in ("num_kp", "image_channel", "estimate_jacobian")}
    generator = {k: v for k, v in arguments["generator"].items()
                 if k not in ("num_kp", "image_channel", "feature_channel")}
    he_params = model_params["he_estimator_params"]
    he = {"block_expansion": he_params["block_expansion"], "num_bins": he_params["num_bins"]}
    if "widths" in he_params:
        he["widths"] = list(he_params["widths"])
    discriminator = {k: v for k, v in arguments["discriminator"].items() if k != "num_channels"}
    discriminator["scales"] = [float(scale) for scale in discriminator["scales"]]
    return {
        "common_params": {"num_kp": common["num_kp"], "num_channels": common["image_channel"],
                          "feature_channel": common["feature_channel"],
                          "estimate_jacobian": common.get("estimate_jacobian", False)},
        "kp_detector_params": kp, "he_estimator_params": he, "generator_params": generator,
        "discriminator_params": discriminator,
    }


def count_indices(state, pattern):
    return len({match.group(1) for key in state for match in [re.match(pattern, key)] if match})


def infer_reference_model_params(checkpoint):
    """A reference-layout ``model_params`` section read off a checkpoint's tensor shapes.

    What the weights cannot tell takes the value of every official config: the keypoint softmax
    temperature 0.1. The keypoint detector's input scale comes from its anti-aliasing kernel
    (absent: scale 1, the Beta release).
    """
    from compat.checkpoints import kernel_scale, scale_names

    kp, he, generator = checkpoint["kp_detector"], checkpoint["he_estimator"], \
        checkpoint["generator"]
    num_blocks = count_indices(kp, r"^predictor\.down_blocks\.down(\d+)\.")
    down_widths = [kp[f"predictor.down_blocks.down{i}.conv.weight"].shape[0]
                   for i in range(num_blocks)]
    reshape_channel = kp["predictor.conv.weight"].shape[0]
    kp_params = {"temperature": 0.1,
                 "block_expansion": kp[f"predictor.up_blocks.up{num_blocks - 1}.conv.weight"]
                 .shape[0],
                 "max_features": max(down_widths), "num_blocks": num_blocks,
                 "scale_factor": kernel_scale(kp["down.weight"]) if "down.weight" in kp else 1,
                 "reshape_channel": reshape_channel,
                 "reshape_depth": reshape_channel // down_widths[-1]}
    dense = "dense_motion_network."
    dense_blocks = count_indices(generator, rf"^{dense}hourglass\.encoder\.down_blocks\.(\d+)\.")
    mask_width = generator[f"{dense}mask.weight"].shape[1]
    occlusion = generator.get(f"{dense}occlusion.weight")
    feature_channel = generator[f"{dense}compress.weight"].shape[1]
    max_features = generator["second.weight"].shape[0]
    dense_params = {
        "block_expansion": generator[f"{dense}hourglass.decoder.up_blocks.{dense_blocks - 1}"
                                     ".conv.weight"].shape[0],
        "max_features": max(generator[f"{dense}hourglass.encoder.down_blocks.{i}.conv.weight"]
                            .shape[0] for i in range(dense_blocks)),
        "num_blocks": dense_blocks,
        "reshape_depth": occlusion.shape[1] // mask_width if occlusion is not None
        else max_features // feature_channel,
        "compress": generator[f"{dense}compress.weight"].shape[0]}
    generator_params = {
        "block_expansion": generator["first.conv.weight"].shape[0],
        "max_features": max_features,
        "num_down_blocks": count_indices(generator, r"^down_blocks\.(\d+)\."),
        "reshape_channel": feature_channel, "reshape_depth": max_features // feature_channel,
        "num_resblocks": count_indices(generator, r"^resblocks_3d\.3dr(\d+)\."),
        "estimate_occlusion_map": occlusion is not None,
        "dense_motion_params": dense_params}
    params = {
        "common_params": {"num_kp": kp["kp.weight"].shape[0],
                          "image_channel": kp["predictor.down_blocks.down0.conv.weight"].shape[1],
                          "feature_channel": feature_channel,
                          "estimate_jacobian": "jacobian.weight" in kp},
        "kp_detector_params": kp_params,
        "he_estimator_params": {"block_expansion": he["conv1.weight"].shape[0],
                                "num_bins": he["fc_pitch.weight"].shape[0],
                                "widths": [he[f"conv{i}.weight"].shape[0] for i in range(2, 6)]},
        "generator_params": generator_params,
    }
    discriminator = checkpoint.get("discriminator")
    if isinstance(discriminator, dict):
        names = scale_names(discriminator)
        prefix = f"discs.{names[0]}.down_blocks."
        widths = [value.shape[0] for key, value in discriminator.items()
                  if re.match(rf"^{re.escape(prefix)}\d+\.conv\.weight(_orig)?$", key)]
        params["discriminator_params"] = {
            "scales": [float(name.replace("-", ".")) for name in names],
            "block_expansion": widths[0] // 2, "max_features": max(widths),
            "num_blocks": len(widths), "sn": any(k.endswith("weight_orig") for k in discriminator)}
    return params


# ----------------------------------------------------------------------------- checking
def check_state(network, state, expected):
    """Raise ``ValueError`` naming the first missing, unexpected or mis-shaped entry."""
    for key, shape in expected.items():
        if key not in state:
            raise ValueError(f"face-vid2vid {network}: missing entry {key!r} (shape {shape}); the "
                             f"checkpoint does not fit these model_params")
        if tuple(state[key].shape) != shape:
            raise ValueError(f"face-vid2vid {network}: entry {key!r} has shape "
                             f"{tuple(state[key].shape)}, expected {shape}; the checkpoint does "
                             f"not fit these model_params")
    for key in state:
        if key not in expected:
            raise ValueError(f"face-vid2vid {network}: unexpected entry {key!r}; the checkpoint "
                             f"does not fit these model_params")


def fill_batch_counters(state, expected):
    """Add ``num_batches_tracked`` = 0 where an old (torch < 0.4.1) checkpoint lacks it."""
    filled = dict(state)
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in filled:
            filled[key] = torch.zeros((), dtype=torch.long)
    return filled


def convert_network_state(network, state, arguments):
    """One reference network's state dict renamed and checked against ``arguments``."""
    scales = arguments.get("scales", (1,)) if network == "discriminator" else (1,)
    renamed = rename_state(network, state, scales)
    expected = expected_shapes(network, arguments)
    renamed = fill_batch_counters(renamed, expected)
    check_state(network, renamed, expected)
    return renamed


def convert_facevid2vid_state(state, model_params=None, include_discriminator=True):
    """A reference checkpoint dict -> ``{NETWORK_PREFIXES[name] + key: tensor}``.

    ``model_params``: the reference config's ``model_params`` the checkpoint was trained with
    (default :data:`VOX_256_MODEL_PARAMS`). The generator class is read off its keys. The
    discriminator is converted when present and ``include_discriminator``. Optimizer states and
    ``epoch`` are not converted.
    """
    if not is_facevid2vid_checkpoint(state):
        raise ValueError("not a face-vid2vid checkpoint: expected the entries "
                         f"{list(REQUIRED_NETWORKS)} with a 3D keypoint head (kp.weight)")
    arguments = network_arguments(model_params or VOX_256_MODEL_PARAMS,
                                  decoder=generator_decoder(state["generator"]))
    networks = list(REQUIRED_NETWORKS)
    if include_discriminator and isinstance(state.get("discriminator"), dict):
        networks.append("discriminator")
    converted = {}
    for network in networks:
        renamed = convert_network_state(network, state[network], arguments[network])
        converted.update({NETWORK_PREFIXES[network] + key: value for key, value in renamed.items()})
    return converted


def network_state(converted, network):
    """One network's entries of a converted state dict, without the prefix."""
    prefix = NETWORK_PREFIXES[network]
    return {key[len(prefix):]: value for key, value in converted.items() if key.startswith(prefix)}


__all__ = ["NETWORK_PREFIXES", "VOX_256_MODEL_PARAMS", "is_facevid2vid_checkpoint",
           "generator_decoder", "rename_key", "rename_state", "network_arguments", "build_network",
           "expected_shapes", "check_state", "convert_network_state", "convert_facevid2vid_state",
           "network_state", "model_params_from_reference", "infer_reference_model_params"]
