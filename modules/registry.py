"""Model registry: the config's ``model:`` key names a class registered here.

Every model has the same constructor shape (``Model(config)`` with the full validated config), so a
new method is one file in ``modules/models/`` whose class is decorated with ``@register_model``.
``build_model(config, checkpoint)`` is the one way to get a ready model: for training,
inference, evaluation and benchmarks alike.
"""
import difflib
import importlib
import pkgutil

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


def build_model(config, checkpoint=None, device="cpu", training=False):
    """The config's model on ``device``, with ``checkpoint`` restored when given (a path or a
    loaded checkpoint dict), in training or evaluation mode."""
    from checkpoint import load_checkpoint, restore_model
    model = get_model_class(config["model"])(config)
    if checkpoint is not None:
        path = checkpoint if isinstance(checkpoint, str) else "(given checkpoint)"
        state = load_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
        restore_model(model, state, path)
    return model.to(device).train(training)
