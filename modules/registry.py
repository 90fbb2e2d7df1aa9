"""Model registry: the config's ``model:`` key names a class registered here.

Every model has the same constructor shape (``Model(config)`` with the full validated config), so a
new method is one file in ``modules/models/`` whose class is decorated with ``@register_model``.
``build_model(config, checkpoint)`` is the one way to get a ready model: for training,
inference, evaluation and benchmarks alike.
"""
import difflib
import importlib
import logging
import pkgutil

log = logging.getLogger(__name__)

_MODELS = {}


def register_model(name):
    def decorator(cls):
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(f"model name {name!r} is registered twice ({_MODELS[name]} and {cls})")
        cls.name = name
        _MODELS[name] = cls
        return cls
    return decorator


def _import_all_models():
    import modules.models as package
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"modules.models.{info.name}")


def registered_models():
    _import_all_models()
    return sorted(_MODELS)


def get_model_class(name):
    _import_all_models()
    if name not in _MODELS:
        known = sorted(_MODELS)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown model {name!r} (config key 'model'). Registered models: "
                       f"{', '.join(known) or '(none)'}.{hint}")
    return _MODELS[name]


def model_schema(name):
    """What ``config.py`` validates a config against: the model's defaults and its own check."""
    from config import ConfigError, ModelSchema
    try:
        cls = get_model_class(name)
    except KeyError as error:
        raise ConfigError(error.args[0]) from None
    return ModelSchema(cls.default_model_params, cls.default_train_params, cls.check_config)


def load_config(name_or_path, overrides=None):
    """A config file (path or name in configs/) validated against its model's schema."""
    import config
    return config.load_config(name_or_path, overrides, model_schema)


def checkpoint_for(config, checkpoint, map_location="cpu"):
    """A checkpoint (path or loaded dict) in this framework's format: a released checkpoint of a
    reference implementation (FOMM, SAFA, face-vid2vid; recognized by its keys) is converted
    for ``config``'s model_params (compat/checkpoints.py)."""
    from checkpoint import load_checkpoint
    state = load_checkpoint(checkpoint, map_location) if isinstance(checkpoint, str) \
        else checkpoint
    if "state_dict" in state:
        return state
    from compat.checkpoints import convert_checkpoint
    converted = convert_checkpoint(state, config["model_params"])
    log.info("%s is a %s reference checkpoint, converted on loading (python -m "
             "tools.convert_checkpoint writes the converted file once)",
             checkpoint if isinstance(checkpoint, str) else "the checkpoint",
             converted["converted_from"]["kind"])
    return converted


def build_model(config, checkpoint=None, device="cpu", training=False):
    """The config's model on ``device``, with ``checkpoint`` restored when given (a path or a
    loaded checkpoint dict, ours or a reference implementation's), in training or evaluation
    mode."""
    from checkpoint import restore_model
    model = get_model_class(config["model"])(config)
    if checkpoint is not None:
        path = checkpoint if isinstance(checkpoint, str) else "(given checkpoint)"
        restore_model(model, checkpoint_for(config, checkpoint), path)
    return model.to(device).train(training)
