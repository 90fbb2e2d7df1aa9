"""Checkpoints: atomic save, safe load, restoring a model, and the random-number state.

A checkpoint is a plain dict of tensors and Python data (``torch.load(..., weights_only=True)``
reads it without running code)::

    model, model_params           which registered model and the model_params it was built with
    state_dict                    the model's weights and buffers
    optimizers, schedulers        per optimizer group (training checkpoints)
    epoch, step, batch_in_epoch   where training stands (the next batch to run)
    rng                           torch / numpy / python / CUDA generator states

This module imports only the leaf :mod:`atomic_files` of the project.
"""
import logging
import os
import random

import numpy as np
import torch

from atomic_files import write_atomically

CHECKPOINT_LATEST = "checkpoint_latest.pth"
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- files
def save_checkpoint_atomic(state, path):
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A kill at any moment leaves either the previous checkpoint or the new one, never half a file;
    a failed write (disk full, read-only folder) raises :class:`atomic_files.OutputWriteError`
    saying why and that the previous checkpoint is intact.
    """
    write_atomically(path, lambda stream: torch.save(state, stream), what="checkpoint")


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint (plain tensors and Python data only; nothing in it can run code)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise RuntimeError(f"cannot load checkpoint {path}: {error}. Checkpoints are .pth files "
                           "written by train.py (they are not archives); a truncated file means "
                           "the copy is incomplete") from None


# ----------------------------------------------------------------------------- random state
def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(
        np.random.get_state()[1].astype(np.int64)), "numpy_pos": np.random.get_state()[2],
        "python": list(random.getstate()[1]), "cuda": torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- model state
def make_checkpoint(model, optimizers, schedulers, epoch, step, batch_in_epoch, config):
    return {"model": model.name, "model_params": config["model_params"],
            "state_dict": model.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
            "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, "rng": rng_state()}


def differing_keys(stored, current, prefix=""):
    """Dotted keys whose values differ between two nested dicts (missing on one side counts)."""
    keys = []
    for key in sorted(set(stored) | set(current), key=str):
        a, b = stored.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def restore_model(model, checkpoint, path):
    """Load a checkpoint's weights into ``model``.

    Refuses a checkpoint of another model, or one whose weights do not fit (naming the
    ``model_params`` keys that differ from the checkpoint's); warns when only hyperparameters
    without weights (e.g. a temperature) differ.
    """
    if checkpoint.get("model") != model.name:
        raise ValueError(f"checkpoint {path} holds a {checkpoint.get('model')!r} model but the "
                         f"config selects {model.name!r}; use that model's config")
    changed = differing_keys(checkpoint["model_params"], model.config.get("model_params", {}),
                             "model_params.") if checkpoint.get("model_params") else []
    own, state = model.state_dict(), checkpoint["state_dict"]
    # a converted reference checkpoint lacks parts the model builds itself (compat/checkpoints.py)
    rebuilt = tuple(checkpoint.get("converted_from", {}).get("initialized_here", ()))
    missing = sorted(k for k in set(own) - set(state) if not (rebuilt and k.startswith(rebuilt)))
    unexpected = sorted(set(state) - set(own))
    resized = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or resized:
        detail = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for label, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("shape differs", resized)) if keys)
        because = f" The config differs from the checkpoint's in {', '.join(changed)}." \
            if changed else ""
        raise ValueError(f"checkpoint {path} does not fit this config's {model.name} model "
                         f"({detail}).{because} Use the config saved next to it (config.yaml in "
                         "its run folder).")
    if changed:
        log.warning("checkpoint %s was trained with other model_params: %s (the weights fit; the "
                    "config's values are used)", path, ", ".join(changed))
    model.load_state_dict(state, strict=not rebuilt)
    if rebuilt:
        log.info("checkpoint %s is a converted reference checkpoint; kept our own %s", path,
                 ", ".join(rebuilt))


__all__ = ["CHECKPOINT_LATEST", "save_checkpoint_atomic", "load_checkpoint", "rng_state",
           "set_rng_state", "make_checkpoint", "differing_keys", "restore_model"]
