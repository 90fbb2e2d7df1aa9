"""The interface every animation model implements (DESIGN.md section 3).

``train.py``, ``reconstruction.py`` and ``animate.py`` only talk to this interface, never to a
specific model. A model is one ``nn.Module`` holding all its networks (generator parts and
discriminator), so one DistributedDataParallel wrapper covers it: ``forward(batch, step=...)``
dispatches to the generator or discriminator step, and DDP synchronizes the gradients of whichever
parameters that step used.
"""
import dataclasses

import torch
from torch import nn


class AnimationModel(nn.Module):
    #: set by ``@register_model``
    name = None
    #: defaults (and schema) of ``config['model_params']``; nested dicts are sections
    default_model_params = {}
    #: defaults merged into ``config['train_params']``: learning rates per optimizer group
    #: (``lr_<group>``) and ``loss_weights``
    default_train_params = {}
    #: names of the optimizer groups stepped with the discriminator losses
    discriminator_groups = ()

    def __init__(self, config):
        super().__init__()
        self.config = config

    # ---------------------------------------------------------------- training
    def forward(self, batch, step="generator", generated=None):
        if step == "generator":
            return self.generator_step(batch)
        if step == "discriminator":
            return self.discriminator_step(batch, generated)
        raise ValueError(f"unknown step {step!r}; expected 'generator' or 'discriminator'")

    def optimizer_groups(self):
        """``{group_name: [parameters]}``; the learning rate is ``train_params['lr_<group_name>']``."""
        raise NotImplementedError

    def generator_step(self, batch):
        """Returns ``(losses, generated)``: weighted scalar losses and a dict of output tensors.

        ``batch`` holds ``source`` and ``driving`` (B x 3 x H x W in [0, 1]) and, when the dataset
        has sidecars, ``source_landmarks``/``driving_landmarks`` (B x 68 x 2, normalized) and
        ``source_flame``/``driving_flame`` (dicts of B x n tensors: shape, exp, pose, cam).
        """
        raise NotImplementedError

    def discriminator_step(self, batch, generated):
        """Weighted scalar discriminator losses; ``{}`` for models without a discriminator."""
        return {}

    # --------------------------------------------------------------- inference
    def encode_source(self, source):
        """Everything the model needs from the source image (keypoints, codes, ...), as a dict."""
        raise NotImplementedError

    def encode_driving(self, driving):
        """Motion description of one batch of driving frames, as a dict."""
        raise NotImplementedError

    def generate(self, source_state, driving_state, reference_state=None, relative=False,
                 adapt_scale=False):
        """Animate: a dict with at least ``prediction`` (B x 3 x H x W in [0, 1]).

        ``relative=True`` applies the motion between ``reference_state`` and ``driving_state`` to
        the source (FOMM's relative transfer; SAFA appendix B); otherwise the driving motion is
        used as is (absolute, as in same-identity reconstruction).
        """
        raise NotImplementedError

    def pose_descriptor(self, state):
        """B x D tensor whose distance picks the reference frame closest to the source."""
        raise NotImplementedError

    @property
    def kp_radius(self):
        """Radius in pixels of the keypoint dots in visual grids (``visualizer_params.kp_size``)."""
        return self.config.get("visualizer_params", {}).get("kp_size")

    def visuals(self, batch, generated):
        """List of ``(title, B x 3 x H x W tensor in [0, 1])`` columns for the logger's grid."""
        return [("source", batch["source"]), ("driving", batch["driving"]),
                ("prediction", generated["prediction"])]


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def set_requires_grad(module, flag):
    for p in module.parameters():
        p.requires_grad_(flag)
    return module


def freeze_batchnorm_stats(module):
    """Put every BatchNorm of ``module`` in eval mode (SAFA freezes the pretrained encoder's stats)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return module




def expand_state(state, batch_size):
    """Repeat a batch-1 source/reference state (dict of tensors, nested) to ``batch_size``."""
    if torch.is_tensor(state):
        return state.expand(batch_size, *state.shape[1:]) if state.shape[:1] == (1,) else state
    if isinstance(state, dict):
        return {k: expand_state(v, batch_size) for k, v in state.items()}
    if dataclasses.is_dataclass(state) and not isinstance(state, type):  # e.g. FaceCodes
        return dataclasses.replace(state, **{f.name: expand_state(getattr(state, f.name), batch_size)
                                             for f in dataclasses.fields(state)})
    return state
