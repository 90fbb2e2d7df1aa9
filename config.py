"""Configuration: YAML files validated against a schema of defaults, plus ``--set`` overrides.

The schema is plain data: a nested dict of defaults. Its shape says which keys exist, its values
say their types (``None`` = any type). The framework's sections live in ``BASE_DEFAULTS``; the
model named by ``model:`` contributes ``model_params`` and extra ``train_params`` (learning rates,
loss weights) and a check of its own, handed in as a ``ModelSchema`` by the caller
(``modules.registry.model_schema``), so this module knows no model.
"""
import copy
import difflib
import logging
import os
from typing import Callable, NamedTuple

import yaml

log = logging.getLogger(__name__)
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and the fix."""


class ModelSchema(NamedTuple):
    """What a model adds to the schema: its defaults, and a check of the merged config that
    raises ``ValueError`` naming the problem (e.g. missing sidecars)."""
    model_params: dict
    train_params: dict
    check: Callable = None


def deep_update(base, changes):
    """A copy of nested dict ``base`` with ``changes`` merged in (dicts merged key by key)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        out[key] = deep_update(out[key], value) if isinstance(value, dict) and \
            isinstance(out.get(key), dict) and out[key] else copy.deepcopy(value)
    return out


BASE_DEFAULTS = {
    "model": "fomm",
    "dataset_params": {
        # Folder in FOMM's layout (train/ and test/, or one folder split by split_seed).
        "root_dir": "data/synthetic",
        "frame_shape": [256, 256, 3],
        # Sample an identity first, then one of its videos (names must look like 'id#video#...').
        "id_sampling": False,
        # CSV with columns 'source,driving' (video names) for animate mode; None = seeded random.
        "pairs_list": None,
        # Used only when root_dir has no train/ and test/ subfolders.
        "split_seed": 0,
        "test_fraction": 0.2,
        # Frames whose size or channel count differs from frame_shape: 'convert' (resize / to RGB,
        # with a logged note) or 'refuse' (error naming the file).
        "on_mismatch": "convert",
        # Optional per-video sidecars next to each video: <stem>.landmarks.npy, <stem>.flame.npz.
        "load_landmarks": False,
        "load_flame": False,
        # <stem>.parsing.npy face-parsing maps (T x H x W uint8, ids of modules/face_parsing.py).
        "load_parsing": False,
        # Training pairs at most this many frames apart (None = any two frames of the video);
        # 1 = consecutive frames, as the landmark detector's registration loss needs.
        "max_frame_gap": None,
        "augmentation_params": {
            "flip_param": {"horizontal_flip": True, "time_flip": True},
            "jitter_param": {"brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.1},
        },
        # When root_dir does not exist and this is set, the synthetic talking-head dataset is
        # generated there on first use (see datasets/synthetic.py).
        "synthetic": None,
    },
    "model_params": {},
    "train_params": {
        "num_epochs": 100,
        "num_repeats": 75,
        "epoch_milestones": [60, 90],
        "lr_decay": 0.1,
        "adam_betas": [0.5, 0.999],
        # Global batch over all processes (each of N processes loads batch_size / N).
        "batch_size": 40,
        "num_workers": 4,
        # Keep a copy of the checkpoint every this many epochs (the latest is always kept).
        "checkpoint_freq": 50,
        # Also write the latest checkpoint every this many iterations (0 = only at epoch ends),
        # so a killed run loses at most this much work.
        "checkpoint_every_steps": 1000,
        # PNG grid of visuals every this many iterations (0 = only at epoch ends).
        "visual_every_steps": 500,
        # Stop after this many iterations in total (None = train all epochs); for tests and smoke runs.
        "max_steps": None,
        # Speed switches (modules/precision.py, docs/performance.md): fp32 | bf16 | fp16 autocast,
        # NHWC memory layout, torch.compile of every network (options: torch.compile's keywords).
        "precision": "fp32",
        "channels_last": False,
        "compile": False,
        "compile_options": {},
        # Losses stay on the device and are read (one host sync) every this many iterations: the
        # log, tensorboard, the progress bar (their mean over those steps) and the NaN check.
        "log_every_steps": 25,
        # Batches each loader worker prepares ahead (with num_workers > 0).
        "prefetch_factor": 4,
    },
    "reconstruction_params": {
        "num_videos": None,
        "format": ".mp4",
        "save_png": True,
        "batch_size": 8,
        "fps": 25,
        # Speed switches as in train_params (null = the train_params value).
        "precision": None,
        "channels_last": None,
        "compile": None,
        "compile_options": None,
    },
    "animate_params": {
        "num_pairs": 50,
        "format": ".mp4",
        "relative": True,
        "adapt_movement_scale": False,
        # Choose the driving frame closest to the source as the reference for relative motion,
        # compared by: landmarks (a face landmark detector), model (the model's pose descriptor:
        # FOMM keypoints, SAFA head pose) or auto (landmarks when a detector loads, else model).
        "find_best_frame": False,
        "best_frame_by": "auto",
        "batch_size": 8,
        # Used when the driving video has no frame rate of its own (frame folders, stacked images).
        "fps": 25,
        # Speed switches as in train_params (null = the train_params value).
        "precision": None,
        "channels_last": None,
        "compile": None,
        "compile_options": None,
    },
    "evaluation_params": {
        # reconstruction (frame 0 drives every frame), pairs (random same-identity frame pairs,
        # both directions), cross (cross-identity reenactment)
        "protocols": ["reconstruction"],
        # subset of l1 akd aeid fid psnr ssim ms_ssim lpips csim aed apd sms; null = all
        "metrics": None,
        "num_videos": None,
        "pairs_per_video": 10,
        "max_frames": None,
        "batch_size": 8,
        "fid_method": "sqrtm",          # or eigh: the same value, faster on CPU
        "arcface_path": None,           # ONNX ArcFace-style identity network (AEID/CSIM)
        "fid_inception_path": None,     # pytorch-fid's pt_inception-2015-12-05 weights
        # Speed switches as in train_params (null = the train_params value).
        "precision": None,
        "channels_last": None,
        "compile": None,
        "compile_options": None,
    },
    # radius in pixels of the keypoint dots in the visual grids
    "visualizer_params": {"kp_size": 3},
}

SECTIONS = list(BASE_DEFAULTS)


def resolve_config_path(name_or_path):
    """A path, or a bare name looked up in ``configs/`` (with or without ``.yaml``)."""
    candidates = [name_or_path, os.path.join(CONFIG_DIR, name_or_path),
                  os.path.join(CONFIG_DIR, name_or_path + ".yaml")]
    for path in candidates:
        if os.path.isfile(path):
            return path
    available = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml")) \
        if os.path.isdir(CONFIG_DIR) else []
    close = difflib.get_close_matches(os.path.basename(name_or_path), available, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"config {name_or_path!r} not found (looked for it as a path and in "
                      f"{CONFIG_DIR}). Available: {', '.join(available) or '(none)'}.{hint}")


def _type_name(value):
    return "null" if value is None else type(value).__name__


def _check_type(key, default, value):
    if default is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads '2e-4' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
        if ok and default:
            value = [_check_type(f"{key}[{i}]", default[0], v) for i, v in enumerate(value)]
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"config key '{key}' expects {_type_name(default)} (like {default!r}), "
                          f"got {_type_name(value)} {value!r}")
    return value


def _merge(defaults, given, prefix):
    """Defaults updated with ``given``, every key and type checked."""
    if not isinstance(given, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '(top level)'}' must be a mapping, "
                          f"got {_type_name(given)}")
    merged = copy.deepcopy(defaults)
    for key, value in given.items():
        path = prefix + str(key)
        if key not in defaults:
            close = difflib.get_close_matches(str(key), [str(k) for k in defaults], n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            valid = ", ".join(str(k) for k in defaults) or "(none)"
            raise ConfigError(f"unknown config key '{path}'{hint} (valid keys here: {valid})")
        default = defaults[key]
        if isinstance(default, dict) and default:
            merged[key] = _merge(default, value, path + ".")
        elif isinstance(default, dict):  # an empty dict in the schema is an open mapping
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{path}' expects a mapping, got {_type_name(value)}")
            merged[key] = copy.deepcopy(value)
        else:
            merged[key] = _check_type(path, default, value)
    return merged


def schema_for(model_schema):
    """The full schema of defaults for one model (the framework's sections plus the model's)."""
    schema = copy.deepcopy(BASE_DEFAULTS)
    schema["model_params"] = copy.deepcopy(model_schema.model_params)
    schema["train_params"] = deep_update(schema["train_params"], model_schema.train_params)
    return schema


def validate(raw, model_schema, model_check=True):
    """Check a raw config dict and fill in defaults; returns a new dict.

    ``model_schema(name) -> ModelSchema`` (raising ``ConfigError`` for an unknown model); its
    ``check`` runs on the merged config unless ``model_check`` is false.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {_type_name(raw)}")
    unknown = [k for k in raw if k not in BASE_DEFAULTS]
    if unknown:
        _merge(BASE_DEFAULTS, {unknown[0]: None}, "")  # raises with the nearest section name
    if "model" not in raw:
        raise ConfigError("config has no 'model' key; add e.g. 'model: fomm' (see "
                          "`python run.py --list_models`)")
    if not isinstance(raw["model"], str):
        raise ConfigError(f"config key 'model' expects str, got {_type_name(raw['model'])}")
    schema = model_schema(raw["model"])
    config = _merge(dict(schema_for(schema), model=raw["model"]), raw, "")
    if model_check and schema.check is not None:
        try:
            schema.check(config)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    return config


def parse_override(text):
    """``'a.b.c=value'`` -> (['a', 'b', 'c'], parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like 'section.key=value'")
    key, raw_value = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw_value)
    except yaml.YAMLError:
        value = raw_value
    return keys, value, raw_value


def apply_overrides(config, overrides, model_schema):
    """Apply ``--set`` overrides to a validated config, typed by the config's own values."""
    config = copy.deepcopy(config)
    for text in overrides or []:
        keys, value, raw_value = parse_override(text)
        node = config
        for depth, key in enumerate(keys[:-1]):
            if not isinstance(node, dict) or key not in node:
                _raise_unknown(keys[:depth + 1], node)
            node = node[key]
        if not isinstance(node, dict) or keys[-1] not in node:
            _raise_unknown(keys, node)
        current = node[keys[-1]]
        if isinstance(current, str) and not isinstance(value, str):
            value = raw_value  # 'name=123' for a string key stays the string '123'
        node[keys[-1]] = value
    return validate(config, model_schema, model_check=False) if overrides else config


def _raise_unknown(keys, node):
    path = ".".join(keys)
    options = [str(k) for k in node] if isinstance(node, dict) else []
    close = difflib.get_close_matches(keys[-1], options, n=1, cutoff=0.5)
    hint = f"; did you mean '{'.'.join(keys[:-1] + [close[0]])}'?" if close else ""
    raise ConfigError(f"--set names unknown config key '{path}'{hint}")


def from_reference_layout(raw, path):
    """A FOMM/SAFA reference-code YAML (no ``model:`` key, its own key names) in our layout,
    with a logged note of how each key was mapped (compat/configs.py)."""
    from compat.configs import convert_reference_config
    try:
        converted, notes = convert_reference_config(raw)
    except ValueError as error:
        raise ConfigError(f"{path}: {error}") from None
    log.info("%s is a reference-code config, read as model %r:\n  %s", path, converted["model"],
             "\n  ".join(notes))
    return converted


def load_config(name_or_path, overrides, model_schema):
    """Read, validate and override a config file (``model_schema``: see :func:`validate`)."""
    path = resolve_config_path(name_or_path)
    with open(path, "r", encoding="utf-8") as handle:
        try:
            raw = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    if raw is None:
        raise ConfigError(f"config {path} is empty; it needs at least a 'model:' key")
    if isinstance(raw, dict) and "model" not in raw and "model_params" in raw:
        raw = from_reference_layout(raw, path)
    try:  # the model's own check runs once the overrides are in
        config = validate(raw, model_schema, model_check=False)
        return validate(apply_overrides(config, overrides, model_schema), model_schema)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def dump_config(config, path):
    """Write ``config`` as YAML, atomically (a failed write leaves the previous file)."""
    from atomic_files import write_atomically
    text = yaml.safe_dump(config, sort_keys=False).encode("utf-8")
    write_atomically(path, lambda handle: handle.write(text), "config")
