"""Released FOMM, SAFA and face-vid2vid checkpoints mapped onto this framework's networks.

A reference checkpoint is a dict of per-network state dicts (``generator``, ``kp_detector``,
``discriminator``, SAFA's ``tdmm``, face-vid2vid's ``he_estimator``) plus optimizer states and the
epoch. It is recognized by its keys (:func:`detect_reference`):

==============  =========================================================================
kind            recognized by
==============  =========================================================================
``fomm``        ``generator`` + ``kp_detector``; vox-256 (spectral norm: ``weight_orig``)
                and vox-adv-256 (keypoint heatmaps: discriminator input 3 + K channels)
``safa``        as FOMM plus GADE / contextual attention keys (``fc_1.weight``,
                ``context_atten_layer.fuse_weight``) and ``tdmm`` (SAFA's end2end)
``safa-tdmm``   ``tdmm`` alone (SAFA's 3DMM pretraining)
``facevid2vid`` ``kp_detector`` with a 3D heatmap head + ``he_estimator`` + ``generator``
                (the public face-vid2vid re-implementation; either generator class)
==============  =========================================================================

face-vid2vid's key renaming and its settings read off the shapes live in
``compat/facevid2vid.py``; this module calls them like the FOMM/SAFA rule tables.

Each reference key is renamed to ours by the rule tables below (regular expressions, first match
wins, unmatched keys keep their name), and the result is checked key for key and shape for shape
against our network built with the same settings: a mismatch raises a ``ValueError`` that names
the first missing and the first unexpected key. Two exact reparametrizations change values, not
only names: the SAFA code's GADE computes gamma = fc_1(c) where ours computes 1 + fc_gamma(c), so
``fc_gamma.bias = fc_1.bias - 1``; and checkpoints of torch < 0.4.1 lack the batch-norm counters
``num_batches_tracked``, which are filled with 0. A few reference entries are constants our
networks rebuild themselves (:data:`DROPPED`); they are checked where that is possible and left
out. Optimizer states are not converted (fine-tuning starts a fresh optimizer).

The converted checkpoint has this framework's layout, ``{"model", "model_params", "state_dict"}``
with state keys ``kp_detector.*``, ``generator.*``, :data:`DISCRIMINATOR_PREFIX` ``*`` and (SAFA)
``tdmm.*``, plus ``converted_from`` notes. SAFA's face model and renderer constants (FLAME,
UV maps) are not part of it: they come from ``flame_params`` as in any SAFA run.

Loading is safe: ``torch.load(..., weights_only=True)``; a file that needs arbitrary unpickling
is refused with the reason.
"""
import copy
import re
from collections import OrderedDict

import torch


DISCRIMINATOR_PREFIX = "adversarial.discriminator."   # where the model keeps its discriminator
NETWORK_PREFIXES = {"kp_detector": "kp_detector.", "generator": "generator.",
                    "discriminator": DISCRIMINATOR_PREFIX, "tdmm": "tdmm."}
FACEVID2VID_PREFIXES = {"kp_detector": "kp_detector.", "he_estimator": "he_estimator.",
                        "generator": "generator.", "discriminator": DISCRIMINATOR_PREFIX}
KINDS = ("fomm", "safa", "safa-tdmm", "facevid2vid")
OPTIONAL_NETWORKS = {   # the demos need only kp_detector and generator (+ tdmm for SAFA)
    "discriminator": "ours keeps its initialization (needed only to continue training)",
    "tdmm": "the 3DMM encoder keeps its initialization (set tdmm_params.checkpoint)",
}
SAFA_GENERATOR_MARKERS = ("fc_1.weight", "context_atten_layer.fuse_weight",
                          "dense_motion_network.occlusion1.weight")

# ----------------------------------------------------------------------------- rename rules
KP_DETECTOR_RULES = [
    (r"^kp\.", "heatmap_head."),
    (r"^jacobian\.", "jacobian_head."),
    (r"^down\.weight$", "downsample.weight"),
]
DENSE_MOTION_RULES = [
    (r"^dense_motion_network\.mask\.", "dense_motion_network.mask_head."),
    (r"^dense_motion_network\.occlusion\.", "dense_motion_network.occlusion_heads.0."),   # O (O_g)
    (r"^dense_motion_network\.occlusion1\.", "dense_motion_network.occlusion_heads.1."),  # O_ca
    (r"^dense_motion_network\.down\.weight$", "dense_motion_network.downsample.weight"),
    (r"^dense_motion_network\.down_motion\.weight$", "dense_motion_network.flow_downsample.weight"),
]
GENERATOR_RULES = DENSE_MOTION_RULES + [
    (r"^first\.", "input_block."),
    (r"^bottleneck\.r(\d+)\.", r"bottleneck_blocks.\1."),
    (r"^final\.", "output_conv."),
]
SAFA_GENERATOR_RULES = GENERATOR_RULES + [
    (r"^fc_1\.", "gade.fc_gamma."),
    (r"^fc_2\.", "gade.fc_delta."),
    (r"^up_blocks\.(\d+)\.fc_1\.", r"up_blocks.\1.gade.fc_gamma."),
    (r"^up_blocks\.(\d+)\.fc_2\.", r"up_blocks.\1.gade.fc_delta."),
    (r"^up_blocks\.(\d+)\.conv_f\.", r"up_blocks.\1.gade.gate_conv."),
    (r"^conv0(\d+)\.0\.", r"contextual_attention.dilated_branches.\1.conv."),
    (r"^conv0(\d+)\.1\.", r"contextual_attention.dilated_branches.\1.norm."),
    (r"^concat_conv\.0\.", "contextual_attention.fuse.conv."),
    (r"^concat_conv\.1\.", "contextual_attention.fuse.norm."),
]
TDMM_RULES = [
    (r"^encoder\.model\.features\.", "backbone."),
    (r"^encoder\.model\.classifier\.1\.", "head."),
]
# reference entries our networks rebuild themselves: key pattern -> why they are left out
DROPPED = {
    "generator": {
        r"^context_atten_layer\.fuse_weight$": "the fixed 3x3 identity kernel of score propagation",
    },
    "tdmm": {
        r"^encoder\.fc\.(weight|bias)$": "the same tensor as encoder.model.classifier.1 (the "
                                         "reference registers its output layer twice)",
        r"^encoder\.down\.weight$": "a 1x1 anti-aliasing kernel at scale 1 (the identity)",
        r"^flame\.": "FLAME model constants (rebuilt from flame_params.model_dir)",
        r"^(uvcoords|uvfaces|face_uvcoords|faces|uv_face_eye_mask|uv_face_mask)$":
            "renderer constants (rebuilt from the FLAME assets)",
    },
}


def rename(key, rules):
    for pattern, replacement in rules:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return key


def scale_names(state):
    """The reference discriminator's per-scale names ('1', '0-5', '0-25'), in config order."""
    names = OrderedDict()
    for key in state:
        match = re.match(r"^discs\.([0-9-]+)\.", key)
        if match:
            names[match.group(1)] = None
    return list(names)


def discriminator_rules(state):
    """``discs.<scale>.down_blocks.i`` -> ``discriminators.<index>.blocks.i``."""
    rules = []
    for index, name in enumerate(scale_names(state)):
        rules += [(rf"^discs\.{re.escape(name)}\.down_blocks\.", f"discriminators.{index}.blocks."),
                  (rf"^discs\.{re.escape(name)}\.conv\.", f"discriminators.{index}.head.")]
    return rules


def discriminator_scales(state):
    """The pyramid scales of a reference discriminator state, in its order."""
    return [float(name.replace("-", ".")) for name in scale_names(state)]


def network_rules(kind, network, state):
    if network == "kp_detector":
        return KP_DETECTOR_RULES
    if network == "generator":
        return SAFA_GENERATOR_RULES if kind == "safa" else GENERATOR_RULES
    if network == "discriminator":
        return discriminator_rules(state)
    if network == "tdmm":
        return TDMM_RULES
    if kind == "facevid2vid":                       # renamed by compat/facevid2vid.py
        return ()
    raise ValueError(f"no key mapping for the reference network {network!r}")


# ----------------------------------------------------------------------------- recognition
def detect_reference(checkpoint):
    """'fomm', 'safa', 'safa-tdmm' or 'facevid2vid' for a reference checkpoint dict (see the
    module docstring)."""
    from compat.facevid2vid import is_facevid2vid_checkpoint
    if not isinstance(checkpoint, dict):
        raise ValueError(f"a reference checkpoint is a dict of state dicts, got "
                         f"{type(checkpoint).__name__}")
    if "state_dict" in checkpoint and "model" in checkpoint:
        raise ValueError("this is already a checkpoint of this framework (it has 'model' and "
                         "'state_dict'); it needs no conversion")
    if is_facevid2vid_checkpoint(unwrap_data_parallel(checkpoint)[0]):
        return "facevid2vid"
    generator = checkpoint.get("generator")
    if isinstance(generator, dict) and "kp_detector" in checkpoint:
        generator = {key.removeprefix("module."): None for key in generator}
        if any(marker in generator for marker in SAFA_GENERATOR_MARKERS):
            return "safa"
        if "dense_motion_network.mask.weight" in generator or "first.conv.weight" in generator:
            return "fomm"
    if "tdmm" in checkpoint and "generator" not in checkpoint:
        return "safa-tdmm"
    raise ValueError(f"not a recognized FOMM, SAFA or face-vid2vid checkpoint; its top-level keys "
                     f"are {sorted(checkpoint)} (expected generator + kp_detector (+ he_estimator),"
                     f" or tdmm alone)")


def fomm_discriminator_variant(state, num_channels=3):
    """Which released discriminator a state is: spectral norm (vox-256) and/or keypoint heatmap
    input (vox-adv-256), as ``{'use_spectral_norm', 'use_kp'}``."""
    first = next((v for k, v in state.items() if re.match(r"^discs\.[0-9-]+\.down_blocks\.0\.conv"
                                                          r"\.weight(_orig)?$", k)), None)
    return {"use_spectral_norm": any(k.endswith("weight_orig") for k in state),
            "use_kp": first is not None and first.shape[1] > num_channels}


# ----------------------------------------------------------------------------- mapping
def unwrap_data_parallel(checkpoint):
    """The checkpoint with 'module.' removed from networks saved through a (Distributed)
    DataParallel wrapper, and a note per such network."""
    unwrapped, notes = dict(checkpoint), []
    for name in {**NETWORK_PREFIXES, **FACEVID2VID_PREFIXES}:
        state = checkpoint.get(name)
        if isinstance(state, dict) and state and all(k.startswith("module.") for k in state):
            unwrapped[name] = OrderedDict((k[len("module."):], v) for k, v in state.items())
            notes.append(f"{name}: saved through a DataParallel wrapper, 'module.' prefix removed")
    return unwrapped, notes


def map_network_state(kind, network, state):
    """Reference state dict of one network -> (our-named state dict, notes)."""
    mapped, notes = OrderedDict(), []
    rules = network_rules(kind, network, state)
    dropped = DROPPED.get(network, {}) if kind.startswith("safa") else {}
    if kind == "facevid2vid":
        from compat.facevid2vid import rename_key
        scales = discriminator_scales(state) if network == "discriminator" else (1,)
        return OrderedDict((rename_key(network, key, scales), value)
                           for key, value in state.items()), notes
    for key, value in state.items():
        reason = next((why for pattern, why in dropped.items() if re.match(pattern, key)), None)
        if reason is not None:
            check_dropped(network, key, value, state)
            notes.append(f"{network}.{key}: left out, {reason}")
            continue
        ours = rename(key, rules)
        if kind == "safa" and network == "generator" and ours.endswith("fc_gamma.bias"):
            value = value - 1.0                              # gamma = fc_1(c) = 1 + fc_gamma(c)
        mapped[ours] = value
    return mapped, notes


def check_dropped(network, key, value, state):
    """Constants we rebuild must be what we rebuild; otherwise refuse the file."""
    if key == "context_atten_layer.fuse_weight":
        size = value.shape[-1]
        if not torch.equal(value.reshape(size, size).float(), torch.eye(size)):
            raise ValueError("generator.context_atten_layer.fuse_weight is not an identity kernel; "
                             "this checkpoint's score propagation cannot be represented here")
    if key.startswith("encoder.fc."):
        twin = state.get(key.replace("encoder.fc.", "encoder.model.classifier.1."))
        if twin is None or not torch.equal(twin, value):
            raise ValueError(f"tdmm.{key} differs from encoder.model.classifier.1: the 3DMM "
                             "encoder's output layer is ambiguous in this checkpoint")


def check_state(mapped, expected, network):
    """Same keys, shapes and dtypes as ``expected`` (our network's state dict), else a clear
    error.

    Missing ``num_batches_tracked`` counters (torch < 0.4.1 checkpoints) are filled with 0.
    """
    for key, value in expected.items():
        if key not in mapped and key.endswith("num_batches_tracked"):
            mapped[key] = torch.zeros((), dtype=torch.long)
    missing = [k for k in expected if k not in mapped]
    unexpected = [k for k in mapped if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"first missing key {missing[0]!r} ({len(missing)} missing)")
        if unexpected:
            parts.append(f"first unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
        raise ValueError(f"{network}: the converted state does not fit our network: "
                         f"{'; '.join(parts)}. The reference config and the model_params used "
                         "for conversion disagree (pass the reference YAML with --config)")
    for key, value in expected.items():
        if tuple(mapped[key].shape) != tuple(value.shape):
            raise ValueError(f"{network}: {key} has shape {tuple(mapped[key].shape)} in the "
                             f"checkpoint but {tuple(value.shape)} in our network; the "
                             "model_params used for conversion do not match the checkpoint")
        if mapped[key].dtype != value.dtype:
            raise ValueError(f"{network}: {key} is {mapped[key].dtype} in the checkpoint but "
                             f"{value.dtype} in our network")
    return OrderedDict((key, mapped[key]) for key in expected)


# ----------------------------------------------------------------------------- settings
def kernel_scale(kernel):
    """The downsampling scale an anti-aliasing kernel ``C x 1 x k x k`` was built for.

    The kernel size is ``k = 2 round(4 sigma) + 1`` with ``sigma = (1 / scale - 1) / 2``, so
    ``scale = 4 / (k + 3)``: exact for the scales 1/2^n of every official config (read from the
    size alone, it works for zero-filled layouts too).
    """
    return 4.0 / (kernel.shape[-1] + 3)


def count(state, pattern):
    return len({m.group(1) for k in state for m in [re.match(pattern, k)] if m})


def hourglass_params(state, prefix):
    """block_expansion, max_features and num_blocks of a reference hourglass."""
    num_blocks = count(state, rf"^{prefix}encoder\.down_blocks\.(\d+)\.")
    outputs = [state[f"{prefix}encoder.down_blocks.{i}.conv.weight"].shape[0]
               for i in range(num_blocks)]
    expansion = state[f"{prefix}decoder.up_blocks.{num_blocks - 1}.conv.weight"].shape[0]
    return {"block_expansion": expansion, "max_features": max(outputs), "num_blocks": num_blocks}


def infer_model_params(kind, checkpoint):
    """Our ``model_params`` for a reference checkpoint, read off its tensor shapes.

    The shapes give a reference-layout ``model_params`` section, converted like a reference YAML
    (``compat.configs``). What the weights cannot tell (the keypoint softmax temperature) takes
    the value of every official config, 0.1; a reference YAML is the better source when at hand.
    """
    from compat.configs import SAFA_CODE_VARIANT, fomm_model_params
    if kind == "facevid2vid":
        from compat.facevid2vid import (generator_decoder, infer_reference_model_params,
                                        model_params_from_reference)
        return model_params_from_reference(infer_reference_model_params(checkpoint),
                                           generator_decoder(checkpoint["generator"]))
    if kind == "safa-tdmm":
        return {"tdmm_params": dict(SAFA_CODE_VARIANT.tdmm_params)}
    kp, generator = checkpoint["kp_detector"], checkpoint["generator"]
    channels = kp["predictor.encoder.down_blocks.0.conv.weight"].shape[1]
    reference = {
        "common_params": {"num_kp": kp["kp.weight"].shape[0], "num_channels": channels,
                          "estimate_jacobian": "jacobian.weight" in kp},
        "kp_detector_params": dict(hourglass_params(kp, "predictor."), temperature=0.1,
                                   scale_factor=state_scale(kp, "down.weight")),
        "generator_params": generator_params(generator),
    }
    if "jacobian.weight" in kp and kp["jacobian.weight"].shape[0] == 4:
        reference["kp_detector_params"]["single_jacobian_map"] = True
    if checkpoint.get("discriminator"):
        reference["discriminator_params"] = discriminator_params(checkpoint["discriminator"],
                                                                 channels)
    params = fomm_model_params(reference)
    return SAFA_CODE_VARIANT.apply(params) if kind == "safa" else params


def state_scale(state, key):
    """The downsampling scale of an anti-aliasing kernel entry (1 when there is none)."""
    return kernel_scale(state[key]) if key in state else 1.0


def generator_params(state):
    """Reference-layout generator_params of a reference generator state."""
    dense = hourglass_params(state, "dense_motion_network.hourglass.")
    dense["scale_factor"] = state_scale(state, "dense_motion_network.down.weight")
    return {
        "block_expansion": state["first.conv.weight"].shape[0],
        "max_features": max(v.shape[0] for k, v in state.items()
                            if re.match(r"^down_blocks\.\d+\.conv\.weight$", k)),
        "num_down_blocks": count(state, r"^down_blocks\.(\d+)\."),
        "num_bottleneck_blocks": count(state, r"^bottleneck\.r(\d+)\."),
        "estimate_occlusion_map": "dense_motion_network.occlusion.weight" in state,
        "dense_motion_params": dense,
    }


def discriminator_params(state, num_channels):
    """Reference-layout discriminator_params of a reference discriminator state."""
    prefix = f"discs.{scale_names(state)[0]}.down_blocks."
    weights = [v for k, v in state.items()
               if re.match(rf"^{re.escape(prefix)}\d+\.conv\.weight(_orig)?$", k)]
    outputs = [w.shape[0] for w in weights]
    variant = fomm_discriminator_variant(state, num_channels)
    return {"scales": discriminator_scales(state), "block_expansion": outputs[0] // 2,
            "max_features": max(outputs), "num_blocks": len(outputs),
            "sn": variant["use_spectral_norm"], "use_kp": variant["use_kp"]}


# ----------------------------------------------------------------------------- our side
def model_prefixes(model):
    """Where each reference network lives in our model's state dict."""
    if model == "facevid2vid":
        return FACEVID2VID_PREFIXES
    return dict(NETWORK_PREFIXES, tdmm="encoder.") if model == "tdmm" else NETWORK_PREFIXES


def build_model_on_meta(model, model_params):
    """Our registered ``model`` built from ``model_params`` on the meta device: every name and
    shape, no memory, no weight files (the ImageNet init and pretraining checkpoint are off)."""
    from config import validate
    from modules.registry import get_model_class, model_schema
    params = copy.deepcopy(model_params)
    if "tdmm_params" in params:
        params["tdmm_params"]["imagenet_init"] = False
        if params["tdmm_params"].get("checkpoint"):
            params["tdmm_params"]["checkpoint"] = None
    config = validate({"model": model, "model_params": params}, model_schema, model_check=False)
    with torch.device("meta"):
        return get_model_class(model)(config)


def network_states(model, full):
    """``{reference network name: our state dict for it}`` from our model's full state dict."""
    states = OrderedDict()
    for name, prefix in model_prefixes(model).items():
        part = OrderedDict((k[len(prefix):], v) for k, v in full.items() if k.startswith(prefix))
        if part:
            states[name] = part
    return states


# ----------------------------------------------------------------------------- conversion
def load_reference_checkpoint(path):
    """A reference checkpoint file, loaded safely (tensors and plain data only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise ValueError(f"refusing to load {path}: it is not a plain-data checkpoint "
                         f"(torch.load with weights_only=True failed: {error}). Loading it would "
                         "run arbitrary code from the file; re-save only its state dicts (plain "
                         "tensors) with a trusted PyTorch and convert that") from None


def convert_checkpoint(checkpoint, model_params=None):
    """A reference checkpoint dict -> this framework's checkpoint dict (see module docstring).

    ``model_params``: our model_params for the checkpoint (e.g. from
    ``compat.configs.convert_reference_config`` of its YAML, or a facevid2vid config's);
    None = read off the shapes.
    """
    kind = detect_reference(checkpoint)
    checkpoint, unwrapped = unwrap_data_parallel(checkpoint)
    model = "tdmm" if kind == "safa-tdmm" else kind
    if model_params is None:
        model_params = infer_model_params(kind, checkpoint)
    ours = build_model_on_meta(model, model_params).state_dict()
    networks = network_states(model, ours)
    prefixes = model_prefixes(model)
    state, notes = OrderedDict(), [f"recognized as a reference {kind} checkpoint"] + unwrapped
    for name, expected in networks.items():
        if name not in checkpoint:
            if name not in OPTIONAL_NETWORKS or model == "tdmm":
                raise ValueError(f"the {kind} checkpoint has no {name!r} entry")
            notes.append(f"no {name} in the checkpoint: {OPTIONAL_NETWORKS[name]}")
            continue
        mapped, dropped = map_network_state(kind, name, checkpoint[name])
        notes += dropped
        checked = check_state(mapped, expected, name)
        state.update((prefixes[name] + key, value) for key, value in checked.items())
    skipped = sorted(k for k in checkpoint if k.startswith("optimizer"))
    if skipped:
        notes.append(f"not converted: {', '.join(skipped)} (optimizer states)")
    # parts the reference checkpoint does not hold (FLAME/renderer constants, GADE's code norms,
    # an absent discriminator): our model keeps building them itself
    initialized_here = sorted({key.split(".")[0] + "." for key in ours if key not in state})
    if initialized_here:
        notes.append(f"built by our model, not converted: {', '.join(initialized_here)}")
    return {"model": model, "model_params": model_params, "state_dict": state,
            "converted_from": {"kind": kind, "epoch": checkpoint.get("epoch"), "notes": notes,
                               "initialized_here": initialized_here}}


def as_framework_checkpoint(checkpoint, model_params=None):
    """A loaded checkpoint in this framework's format: ours as it is, a recognized reference
    checkpoint converted (:func:`convert_checkpoint`, with ``model_params`` when given)."""
    if isinstance(checkpoint, dict) and "model" in checkpoint and "state_dict" in checkpoint:
        return checkpoint
    return convert_checkpoint(checkpoint, model_params)


__all__ = ["DISCRIMINATOR_PREFIX", "KINDS", "detect_reference", "map_network_state",
           "check_state", "build_model_on_meta", "network_states", "infer_model_params",
           "load_reference_checkpoint", "convert_checkpoint", "as_framework_checkpoint",
           "kernel_scale", "scale_names"]
