"""Model registry: the config's ``model:`` key names a builder registered here.

Every model has the same constructor shape (``Model(config)`` with the full validated config), so a
new method is one file in ``modules/models/`` that decorates its class with ``@register_model``.
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


def build_model(config):
    return get_model_class(config["model"])(config)
