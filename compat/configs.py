"""Reference YAML configs (FOMM's ``config/vox-256.yaml`` layout, SAFA's ``config/end2end.yaml``)
converted to this framework's config layout, with a note for every key.

The reference files have no ``model:`` key and their own key names; the sections are the same
(``dataset_params``, ``model_params``, ``train_params``, ``reconstruction_params``,
``animate_params``, ``visualizer_params``). :func:`convert_reference_config` returns
``(config, notes)``: the config holds only keys this framework knows (our defaults fill the rest
when it is validated) and each note says how one reference key was mapped, or that it was
ignored and why.

A converted network reproduces the reference network: the FOMM/SAFA networks default to the
reference code's behaviour, and a SAFA config gets :data:`SAFA_CODE_VARIANT`, the switches that
select the authors' code where it departs from the paper.
"""
import copy

import yaml

# SAFA's authors' code where it departs from the paper (modules/safa_generator.py lists them)
SAFA_CODE_SAFA_PARAMS = {
    "use_3d_motion": True,
    "use_contextual_attention": True,
    "use_gade": True,
    "gade_condition": "feature",              # the 3DMM encoder's 1280-d feature
    "gade_norm": "none",
    "skip_connections": False,
    "decoder_gade": True,
    "heatmap_3d": "source_minus_driving",
    "contextual_attention": {
        "patch_size": 3, "rate": 2, "softmax_scale": 10.0, "fuse_size": 3,
        "dilations": [1, 2, 4, 8],
        "paste_back": False, "map_marks_visible": False, "downsample": "nearest",
        "similarity": "key_normalized", "propagation": "flattened",
        "key_weighting": "mean_scale", "overlap": "constant",
    },
}
SAFA_CODE_TDMM_PARAMS = {"imagenet_init": False,       # the weights come from the checkpoint
                         "imagenet_normalize": False}  # the authors feed [0, 1] images as they are


class SafaCodeVariant:
    """Adds the authors' code switches (safa_params, tdmm_params) to converted model_params."""

    safa_params = SAFA_CODE_SAFA_PARAMS
    tdmm_params = SAFA_CODE_TDMM_PARAMS

    def apply(self, model_params):
        params = copy.deepcopy(model_params)
        params["safa_params"] = copy.deepcopy(self.safa_params)
        params["tdmm_params"] = dict(params.get("tdmm_params", {}), **self.tdmm_params)
        # SAFA's occlusion maps follow use_contextual_attention (O_g, and O_ca with it)
        params["generator_params"]["dense_motion_params"].pop("num_occlusion_maps", None)
        return params


SAFA_CODE_VARIANT = SafaCodeVariant()

FACEVID2VID_MARKERS = ("he_estimator_params",)


def join(prefix, key):
    return f"{prefix}.{key}" if prefix else key


class Notes(list):
    def mapped(self, source, target, value=None):
        self.append(f"{source} -> {target}" + ("" if value is None else f" = {value!r}"))

    def ignored(self, source, why):
        self.append(f"{source}: ignored ({why})")


# ----------------------------------------------------------------------------- model_params
def copy_keys(section, keys, target, prefix, notes, destination=None):
    """Copy ``keys`` present in ``section`` (same names) into ``target``."""
    for key in keys:
        if key in section:
            target[key] = copy.deepcopy(section[key])
            notes.mapped(join(prefix, key), join(destination or prefix, key))


def leftover(section, known, prefix, notes, why="no counterpart in this framework"):
    for key in section:
        if key not in known:
            notes.ignored(join(prefix, key), why)


def fomm_model_params(reference, notes=None):
    """Our model_params (fomm layout) from a reference ``model_params`` section."""
    notes = Notes() if notes is None else notes
    common = reference.get("common_params", {})
    ours = {"common_params": {}}
    copy_keys(common, ("num_kp", "num_channels", "estimate_jacobian"), ours["common_params"],
              "model_params.common_params", notes)
    leftover(common, ("num_kp", "num_channels", "estimate_jacobian"),
             "model_params.common_params", notes)
    ours["kp_detector_params"] = kp_detector_params(reference.get("kp_detector_params", {}), notes)
    ours["generator_params"] = generator_params(reference.get("generator_params", {}), notes)
    if "discriminator_params" in reference:
        ours["discriminator_params"] = discriminator_params(reference["discriminator_params"],
                                                            notes)
    return ours


def kp_detector_params(section, notes):
    prefix = "model_params.kp_detector_params"
    known = ("block_expansion", "max_features", "num_blocks", "scale_factor", "temperature",
             "single_jacobian_map")
    ours = {}
    copy_keys(section, known, ours, prefix, notes)
    if "pad" in section:
        ours["head_padding"] = section["pad"]
        notes.mapped(f"{prefix}.pad", f"{prefix}.head_padding", section["pad"])
    leftover(section, known + ("pad",), prefix, notes)
    return ours


def generator_params(section, notes):
    prefix = "model_params.generator_params"
    known = ("block_expansion", "max_features", "num_down_blocks", "num_bottleneck_blocks")
    ours = {}
    copy_keys(section, known, ours, prefix, notes)
    dense_section = section.get("dense_motion_params", {})
    dense_known = ("block_expansion", "max_features", "num_blocks", "scale_factor")
    dense = {}
    copy_keys(dense_section, dense_known, dense, f"{prefix}.dense_motion_params", notes)
    leftover(dense_section, dense_known, f"{prefix}.dense_motion_params", notes)
    occlusion = bool(section.get("estimate_occlusion_map", False))
    dense["num_occlusion_maps"] = int(occlusion)
    notes.mapped(f"{prefix}.estimate_occlusion_map",
                 f"{prefix}.dense_motion_params.num_occlusion_maps", int(occlusion))
    ours["dense_motion_params"] = dense
    leftover(section, known + ("estimate_occlusion_map", "dense_motion_params"), prefix, notes)
    return ours


def discriminator_params(section, notes):
    prefix = "model_params.discriminator_params"
    known = ("scales", "block_expansion", "max_features", "num_blocks", "use_kp", "kp_variance")
    ours = {}
    copy_keys(section, known, ours, prefix, notes)
    ours["use_spectral_norm"] = bool(section.get("sn", False))
    notes.mapped(f"{prefix}.sn", f"{prefix}.use_spectral_norm", ours["use_spectral_norm"])
    ours.setdefault("use_kp", False)
    leftover(section, known + ("sn",), prefix, notes)
    return ours


# ----------------------------------------------------------------------------- other sections
DATASET_KEYS = ("root_dir", "frame_shape", "id_sampling", "pairs_list", "augmentation_params")
TRAIN_KEYS = ("num_epochs", "num_repeats", "epoch_milestones", "lr_generator",
              "lr_discriminator", "lr_kp_detector", "lr_tdmm", "batch_size", "scales",
              "checkpoint_freq", "transform_params")
FOMM_LOSS_KEYS = ("generator_gan", "discriminator_gan", "feature_matching", "perceptual",
                  "equivariance_value", "equivariance_jacobian")


def dataset_params(section, notes):
    prefix = "dataset_params"
    ours = {}
    copy_keys(section, DATASET_KEYS, ours, prefix, notes)
    if "meta_dir" in section:
        ours["load_landmarks"] = True
        notes.append(f"{prefix}.meta_dir -> {prefix}.load_landmarks = True (the reference's "
                     "per-video landmark pickles are not read here; write landmark sidecars with "
                     "tools/extract_landmarks.py)")
    leftover(section, DATASET_KEYS + ("meta_dir",), prefix, notes)
    return ours


def train_params(section, safa, notes):
    prefix = "train_params"
    ours = {"adam_betas": [0.5, 0.999]}
    notes.append(f"{prefix}.adam_betas = [0.5, 0.999] (the reference code's Adam; not in its YAML)")
    copy_keys(section, TRAIN_KEYS, ours, prefix, notes)
    weights_section = section.get("loss_weights", {})
    weights = {}
    copy_keys(weights_section, FOMM_LOSS_KEYS, weights, f"{prefix}.loss_weights", notes)
    known = FOMM_LOSS_KEYS
    if safa:
        known += ("landmark", "photometric", "tdmm_param")
        weights["tdmm"] = 1.0
        copy_keys(weights_section, ("landmark", "photometric"), weights,
                  f"{prefix}.loss_weights", notes)
        if "tdmm_param" in weights_section:
            # the code weighs mean(alpha^2) by tdmm_param and mean(beta^2) by 0.8 tdmm_param
            value = weights_section["tdmm_param"]
            weights["shape_regularization"], weights["expression_regularization"] = \
                value, 0.8 * value
            notes.append(f"{prefix}.loss_weights.tdmm_param -> shape_regularization = {value!r},"
                         f" expression_regularization = {0.8 * value!r} (the code's 0.8 ratio)")
    leftover(weights_section, known, f"{prefix}.loss_weights", notes)
    ours["loss_weights"] = weights
    leftover(section, TRAIN_KEYS + ("loss_weights",), prefix, notes)
    return ours


def reconstruction_params(section, notes):
    ours = {}
    copy_keys(section, ("num_videos", "format"), ours, "reconstruction_params", notes)
    leftover(section, ("num_videos", "format"), "reconstruction_params", notes)
    return ours


def animate_params(section, notes):
    prefix = "animate_params"
    ours = {}
    copy_keys(section, ("num_pairs", "format"), ours, prefix, notes)
    normalization = section.get("normalization_params", {})
    if "use_relative_movement" in normalization:
        ours["relative"] = bool(normalization["use_relative_movement"])
        notes.mapped(f"{prefix}.normalization_params.use_relative_movement", f"{prefix}.relative",
                     ours["relative"])
    if "adapt_movement_scale" in normalization:
        ours["adapt_movement_scale"] = bool(normalization["adapt_movement_scale"])
        notes.mapped(f"{prefix}.normalization_params.adapt_movement_scale",
                     f"{prefix}.adapt_movement_scale", ours["adapt_movement_scale"])
    if "use_relative_jacobian" in normalization:
        key = f"{prefix}.normalization_params.use_relative_jacobian"
        if normalization["use_relative_jacobian"]:
            notes.append(f"{key}: implied (relative animation here moves the Jacobians "
                         "relatively)")
        else:
            notes.ignored(key, "relative animation here always moves the Jacobians relatively")
    leftover(normalization, ("use_relative_movement", "adapt_movement_scale",
                             "use_relative_jacobian"), f"{prefix}.normalization_params", notes)
    leftover(section, ("num_pairs", "format", "normalization_params"), prefix, notes)
    return ours


def visualizer_params(section, notes):
    ours = {}
    copy_keys(section, ("kp_size",), ours, "visualizer_params", notes)
    leftover(section, ("kp_size",), "visualizer_params", notes, "drawing style of the reference")
    return ours


# ----------------------------------------------------------------------------- whole configs
def is_safa(reference):
    train = reference.get("train_params", {})
    return ("lr_tdmm" in train or "meta_dir" in reference.get("dataset_params", {})
            or any(k in train.get("loss_weights", {}) for k in ("landmark", "tdmm_param")))


def convert_reference_config(reference):
    """A reference config dict -> ``(our config dict, notes)`` (see the module docstring)."""
    if not isinstance(reference, dict) or "model_params" not in reference:
        raise ValueError("a reference config is a mapping with a model_params section (FOMM's "
                         "config/vox-256.yaml layout)")
    if "model" in reference:
        raise ValueError("this config has a 'model:' key: it is already in this framework's "
                         "layout and needs no conversion")
    model_params_section = reference["model_params"]
    if any(key in model_params_section for key in FACEVID2VID_MARKERS):
        raise ValueError("this is a face-vid2vid config (it has he_estimator_params); only FOMM "
                         "and SAFA configs are converted here")
    safa = is_safa(reference)
    notes = Notes([f"recognized as a reference {'SAFA' if safa else 'FOMM'} config"])
    model_params = fomm_model_params(model_params_section, notes)
    leftover(model_params_section, ("common_params", "kp_detector_params", "generator_params",
                                    "discriminator_params"), "model_params", notes)
    if safa:
        model_params = SAFA_CODE_VARIANT.apply(model_params)
        notes.append("model_params.safa_params, tdmm_params: the authors' code variant "
                     "(compat.configs.SAFA_CODE_VARIANT)")
    config = {"model": "safa" if safa else "fomm", "model_params": model_params}
    converters = {"dataset_params": dataset_params, "reconstruction_params": reconstruction_params,
                  "animate_params": animate_params, "visualizer_params": visualizer_params}
    for section, convert in converters.items():
        if section in reference:
            config[section] = convert(reference[section] or {}, notes)
    if "train_params" in reference:
        config["train_params"] = train_params(reference["train_params"] or {}, safa, notes)
    leftover(reference, tuple(converters) + ("model_params", "train_params"), "", notes,
             "unknown section")
    return config, list(notes)


def load_reference_config(path):
    """Read a reference YAML (safely) and convert it: ``(config, notes)``."""
    with open(path, encoding="utf-8") as handle:
        return convert_reference_config(yaml.safe_load(handle))


__all__ = ["convert_reference_config", "load_reference_config", "fomm_model_params",
           "SAFA_CODE_VARIANT", "SAFA_CODE_SAFA_PARAMS", "SAFA_CODE_TDMM_PARAMS"]
