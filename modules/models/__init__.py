"""One file per animation method; each registers itself with ``modules.registry.register_model``."""
