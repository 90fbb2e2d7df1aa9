"""Reading a pretrained network's weights from a file the user places (nothing is downloaded)."""
import torch


def load_weights_file(path, what, hint):
    """The plain-data contents of ``path`` (``torch.load(..., weights_only=True)``); a missing
    file is a ``FileNotFoundError`` naming ``what`` was looked for and ``hint`` (how to get it or
    do without)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found at {path}: {hint}") from None


__all__ = ["load_weights_file"]
