"""Compatibility with the public reference implementations: their checkpoints and YAML configs."""
