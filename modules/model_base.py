"""The interface every model implements (docs/design.md, "The model contract").

``train.py``, ``reconstruction.py``, ``animate.py`` and ``evaluation/`` only talk to this
interface, never to a specific model. A model is one ``nn.Module`` holding all its networks
(generator parts, discriminator inside its adversarial objective), so one DistributedDataParallel
wrapper covers it: ``forward(batch, step=...)`` dispatches to the generator or discriminator step.

What a model declares (class attributes):

    default_model_params   schema + defaults of config['model_params']
    default_train_params   merged into config['train_params']: lr_<group>, loss_weights, ...
    tiny_config            its CPU-sized config in configs/ (the contract test trains it)
    animates               False for models that only pretrain a part (3DMM encoder, landmarks)
    driving_signal         what drives an animation: 'frames', 'landmarks' or 'codes'
    sidecars(config)       per-video annotations the training data must carry ('landmarks',
                           'flame', ...); checked when the config is validated

What a model implements:

    optimizer_groups()                     {group: [parameters]}
    prepare_training(dataset)              optional: statistics taken from the training data
    generator_step(batch)                  (losses, generated)
    discriminator_step(batch, generated)   losses ({} without a discriminator)
    encode_source(source) / encode_driving(driving)   dicts ("states") of what inference needs
    relative_motion(source, driving, reference, adapt_scale)   the driving state, made relative
    transfer(source, driving)              {'prediction': B x 3 x H x W, ...}
    pose_descriptor(state), visuals(batch, generated)
    edit(source, edits)                    optional: driving states showing the source edited
                                           (modules/editing.py), for models with an explicit
                                           head pose and expression

``generate`` is shared: it checks the states' batch sizes, expands a batch-1 source (and
reference) over the driving batch, applies ``relative_motion`` when asked, then ``transfer``.
"""
import dataclasses

import torch
from torch import nn

from flame.codes import FaceCodes

DRIVING_SIGNALS = ("frames", "landmarks", "codes")
# what makes each sidecar kind, for the config check's message
SIDECAR_TOOLS = {
    "landmarks": ("68-landmark sidecars (<video>.landmarks.npy)", "load_landmarks",
                  "python -m tools.extract_landmarks --input DATASET_ROOT"),
    "flame": ("3DMM code sidecars (<video>.flame.npz)", "load_flame",
              "python -m tools.fit_3dmm --checkpoint TDMM_CHECKPOINT --input DATASET_ROOT"),
    "parsing": ("face-parsing sidecars (<video>.parsing.npy, T x H x W uint8)", "load_parsing",
                "a face parser, its labels converted to the ids of modules/face_parsing.py"),
}


class AnimationModel(nn.Module):
    name = None                 # set by @register_model
    default_model_params = {}
    default_train_params = {}
    tiny_config = None
    animates = True
    driving_signal = "frames"
    @property
    def discriminator_groups(self):
        """Optimizer groups stepped with the discriminator losses: those of the model's
        ``adversarial`` objective (:class:`modules.objectives.AdversarialObjective`), if any."""
        adversarial = getattr(self, "adversarial", None)
        return adversarial.group_names if adversarial is not None else ()

    def __init__(self, config):
        super().__init__()
        self.config = config

    # ---------------------------------------------------------------- declarations
    @classmethod
    def sidecars(cls, config):
        """Sidecar kinds the training data must carry under ``config`` (e.g. {'landmarks'})."""
        return set()

    @classmethod
    def check_config(cls, config):
        """Errors in a validated config that only the model can see (raise ``ValueError``)."""
        dataset = config["dataset_params"]
        for kind in sorted(cls.sidecars(config)):
            what, key, tool = SIDECAR_TOOLS[kind]
            if not dataset.get(key):
                raise ValueError(
                    f"model {cls.name!r} trains on {what}, but dataset_params.{key} is false. "
                    f"Make them with `{tool}` and set dataset_params.{key}: true (the synthetic "
                    "dataset writes them already)")

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

    def prepare_training(self, dataset):
        """Statistics a model takes from its training data before its first step (none by
        default); a resumed run has them from its checkpoint."""

    def generator_step(self, batch):
        """Returns ``(losses, generated)``: weighted scalar losses and a dict of output tensors.

        ``batch`` holds ``source`` and ``driving`` (B x 3 x H x W in [0, 1]) and the sidecars the
        model asked for: ``source_landmarks``/``driving_landmarks`` (B x K x 2, normalized, NaN
        rows where no face was found), ``source_codes``/``driving_codes`` (FaceCodes).
        """
        raise NotImplementedError

    def discriminator_step(self, batch, generated):
        """Weighted scalar discriminator losses; ``{}`` for models without a discriminator."""
        return {}

    # --------------------------------------------------------------- inference
    def encode_source(self, source):
        """Everything the model needs from the source image, computed once per source."""
        raise NotImplementedError(f"model {self.name!r} does not animate")

    def encode_driving(self, driving):
        """Motion description of one batch of driving frames."""
        raise NotImplementedError(f"model {self.name!r} does not animate")

    def relative_motion(self, source, driving, reference, adapt_scale=False):
        """The driving state that moves the source as the driving frame moved since the
        reference frame (FOMM's relative transfer; SAFA appendix B). States are batch-aligned."""
        raise NotImplementedError(f"model {self.name!r} has no relative motion")

    def transfer(self, source, driving):
        """Animate batch-aligned source and driving states: a dict with ``prediction``."""
        raise NotImplementedError(f"model {self.name!r} does not animate")

    def generate(self, source_state, driving_state, reference_state=None, relative=False,
                 adapt_scale=False):
        """Animate the source with the driving motion: absolute, or (``relative``) the motion
        since ``reference_state``. A batch-1 source (and reference) serves every driving frame.
        Returns a dict with at least ``prediction`` (B x 3 x H x W in [0, 1])."""
        batch = state_batch_size(driving_state)
        source = expand_state(source_state, batch, "source_state")
        if relative:
            if reference_state is None:
                raise ValueError("relative animation needs reference_state (the encoded driving "
                                 "frame whose pose matches the source)")
            reference = expand_state(reference_state, batch, "reference_state")
            driving_state = self.relative_motion(source, driving_state, reference, adapt_scale)
        return self.transfer(source, driving_state)

    def edit(self, source, edits):
        """A driving state (batch ``len(edits)``) that shows the batch-1 ``source`` state with each
        :class:`modules.editing.FaceEdit` applied (head rotation, jaw, expression, placement).
        ``transfer(source expanded, edit(source, edits))`` renders the edited frames."""
        raise NotImplementedError(f"model {self.name!r} has no editable head pose or expression "
                                  "(models driven by 3DMM codes or 3D keypoints have)")

    def driving_smoother(self, fps):
        """A fresh stateful ``state -> state`` filter over one driving video's states in frame
        order (e.g. One-Euro on fitted codes), or None: no smoothing (the default)."""
        return None

    def pose_descriptor(self, state):
        """B x D tensor whose distance picks the reference frame closest to the source."""
        raise NotImplementedError(f"model {self.name!r} does not animate")

    @property
    def kp_radius(self):
        """Radius in pixels of the keypoint dots in visual grids (``visualizer_params.kp_size``)."""
        return self.config.get("visualizer_params", {}).get("kp_size")

    def visuals(self, batch, generated):
        """List of ``(title, B x 3 x H x W tensor in [0, 1])`` columns for the logger's grid."""
        return [("source", batch["source"]), ("driving", batch["driving"]),
                ("prediction", generated["prediction"])]


# ----------------------------------------------------------------------------- states
def _leaves(state):
    if torch.is_tensor(state):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _leaves(value)
    elif isinstance(state, FaceCodes):
        for _, value in state.fields():
            yield value


def state_batch_size(state):
    """Batch size of a state (dict of tensors, nested dicts, FaceCodes)."""
    for leaf in _leaves(state):
        if leaf.dim():
            return leaf.shape[0]
    raise ValueError("a model state holds no batched tensor")


def expand_state(state, batch_size, what="state"):
    """A batch-1 state repeated (without copying) to ``batch_size``; a state of that size as is.
    Any other batch size is an error naming ``what``."""
    size = state_batch_size(state)
    if size not in (1, batch_size):
        raise ValueError(f"{what} has batch size {size} but the driving frames have "
                         f"{batch_size}; give one source (batch 1) or one per driving frame")
    return state if size == batch_size else _expand(state, batch_size)


def _expand(state, batch_size):
    if torch.is_tensor(state):
        return state.expand(batch_size, *state.shape[1:]) if state.dim() else state
    if isinstance(state, dict):
        return {k: _expand(v, batch_size) for k, v in state.items()}
    if isinstance(state, FaceCodes):
        return dataclasses.replace(state, **{name: _expand(value, batch_size)
                                             for name, value in state.fields()})
    if isinstance(state, (list, tuple)):
        return type(state)(_expand(v, batch_size) for v in state)
    return state
