"""Speed switches of training and inference, in one place: precision, memory layout, compilation.

Config keys (``train_params``; ``reconstruction_params``, ``animate_params`` and
``evaluation_params`` take the same keys, where ``null`` means "as in train_params"):

    precision        fp32 | bf16 | fp16. bf16 and fp16 run the forward passes under
                     ``torch.autocast``: convolutions and matrix products in 16 bits, the weights,
                     optimizer state and gradients in float32. fp16 also scales the loss
                     (``torch.amp.GradScaler``) so that small gradients do not underflow.
    channels_last    convolution weights and input images in NHWC memory layout (what tensor
                     cores want for 16-bit convolutions).
    compile          ``torch.compile`` every network of the model in place (state-dict keys
                     unchanged, so checkpoints are the same files).
    compile_options  keyword arguments of ``torch.compile`` (e.g. ``{mode: max-autotune}``).

Float32 islands. Autocast decides per operation; a few places of the framework need float32
whatever autocast would choose, because 16-bit rounding there is amplified (coordinates of a warp,
a softmax at low temperature, a mesh's vertices, a loss's mean). Those places are decorated with
:func:`full_precision` (autocast off, 16-bit arguments cast to float32) where they are defined,
each with a comment saying why; the list is in docs/performance.md. The same decorator costs
nothing when autocast is off.

What uses this module: ``train.train`` (``StepPrecision`` around ``train_step``,
``prepare_model``), and ``reconstruction.py``, ``animate.py`` and ``evaluation/cli.py`` through
:func:`prepare_inference` (one wrapper around the model; every call through it runs under the
inference switches).
"""
import contextlib
import dataclasses
import functools
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPEED_KEYS = ("precision", "channels_last", "compile", "compile_options")
HALF_DTYPES = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class SpeedSettings:
    """The speed switches of one run (see the module docstring)."""
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    compile_options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of "
                             f"{', '.join(PRECISIONS)}; set e.g. train_params.precision: bf16")

    @classmethod
    def from_params(cls, params, fallback=None, section="train_params"):
        """Settings from a config section; a key that is missing or null takes ``fallback``'s
        value (the train_params section for the inference sections)."""
        values = {}
        for key in SPEED_KEYS:
            value = params.get(key)
            if value is None and fallback is not None:
                value = fallback.get(key)
            if value is not None:
                values[key] = value
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{section}.{error}") from None

    @classmethod
    def for_inference(cls, config, section):
        """The switches of an inference mode (``reconstruction_params``, ``animate_params`` or
        ``evaluation_params``), falling back to those of training."""
        return cls.from_params(config.get(section, {}), config.get("train_params", {}), section)

    @property
    def dtype(self):
        return PRECISIONS[self.precision]

    def autocast(self, device):
        """The autocast context of this precision on ``device`` (none for fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.dtype)

    def describe(self):
        parts = [self.precision]
        if self.channels_last:
            parts.append("channels_last")
        if self.compile:
            parts.append("compiled" + (f" {self.compile_options}" if self.compile_options else ""))
        return " + ".join(parts)


class StepPrecision:
    """Autocast and (fp16) loss scaling of training steps on one device.

    ``autocast()`` wraps forward passes; ``backward(loss)``, ``step(optimizer)`` and ``update()``
    replace ``loss.backward()``, ``optimizer.step()`` and the end of an iteration. In fp16 one
    gradient scaler serves every optimizer (generator and discriminator steps alike) and its scale
    is updated once per iteration, as PyTorch's recipe for several losses and optimizers.
    ``scaler.step`` reads whether the gradients were finite, a host sync per optimizer step: the
    price of fp16; bf16 and fp32 have none.
    """

    def __init__(self, precision="fp32", device="cpu"):
        self.settings = precision if isinstance(precision, SpeedSettings) \
            else SpeedSettings(precision)
        self.device = torch.device(device)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.settings.precision == "fp16")

    @property
    def precision(self):
        return self.settings.precision

    def autocast(self):
        return self.settings.autocast(self.device)

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler.is_enabled() else loss).backward()

    def step(self, optimizer):
        if self.scaler.is_enabled():
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def update(self):
        if self.scaler.is_enabled():
            self.scaler.update()


# ----------------------------------------------------------------------------- float32 islands
def autocast_device_type():
    """The device type whose autocast is on here ('cuda' or 'cpu'), or None."""
    for device_type in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device_type):
            return device_type
    return None


def to_float32(value):
    """``value`` with every float16/bfloat16 tensor in it cast to float32 (dicts, lists, tuples and
    dataclasses such as ``FaceCodes`` are walked; float64 and everything else stay as they are)."""
    if torch.is_tensor(value):
        return value.float() if value.dtype in HALF_DTYPES else value
    if isinstance(value, dict):
        return type(value)((k, to_float32(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(to_float32(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: to_float32(getattr(value, f.name)) for f in dataclasses.fields(value)
                   if f.init}
        return dataclasses.replace(value, **changes)
    return value


def full_precision(function):
    """Decorator: run ``function`` in float32 even inside an autocast region.

    Autocast is switched off for the call and 16-bit tensor arguments are cast to float32, so
    every operation inside (matrix products included) computes and returns float32. Outside
    autocast the function is called as it is (float64 parity tests keep float64).
    """
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        device_type = autocast_device_type()
        if device_type is None:
            return function(*args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return function(*to_float32(args), **to_float32(kwargs))
    return wrapper


# ----------------------------------------------------------------------------- layout, compile
def channels_last(value):
    """Every 4D floating tensor in ``value`` (a tensor or a dict of them, as a batch) in
    channels-last memory layout; everything else unchanged."""
    if torch.is_tensor(value):
        if value.dim() == 4 and value.is_floating_point():
            return value.contiguous(memory_format=torch.channels_last)
        return value
    if isinstance(value, dict):
        return {k: channels_last(v) for k, v in value.items()}
    return value


def networks(module):
    """The modules that ``compile`` compiles: each child with a ``forward`` of its own, or, for a
    container without one (e.g. the adversarial objective holding the discriminator), its
    children in turn."""
    found = []
    for child in module.children():
        if type(child).forward is not nn.Module.forward:
            found.append(child)
        else:
            found.extend(networks(child))
    return found


def to_channels_last(model):
    """4D parameters and buffers (2D convolutions) in channels-last layout, 5D ones (the 3D
    convolutions of facevid2vid and MMFA) in channels-last-3d; same Parameter objects."""
    layouts = {4: torch.channels_last, 5: torch.channels_last_3d}
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for tensor in tensors.values():
                if tensor is not None and tensor.dim() in layouts:
                    tensor.data = tensor.data.contiguous(memory_format=layouts[tensor.dim()])
    return model


def prepare_model(model, settings):
    """Apply the layout and compile switches to ``model`` in place; returns it.

    channels_last converts the convolution weights (the parameters stay the same objects, so
    optimizers built before or after both work). compile compiles each network's forward in place
    (``nn.Module.compile``): the model's own glue code (losses, dicts of states) stays eager and
    the state-dict keys do not change.
    """
    if settings.channels_last:
        to_channels_last(model)
    if settings.compile:
        for network in networks(model):
            network.compile(**dict(settings.compile_options))
    return model


# ----------------------------------------------------------------------------- inference
class InferenceModel:
    """A model whose inference calls run under ``settings``: without gradients, under autocast for
    16-bit precisions, with channels-last images when asked, and with float32 results (so that
    metrics, video writing and comparisons never see 16-bit numbers).

    Every other attribute is the model's own (``config``, ``driving_signal``, ``parameters()``,
    ...). The calls that run the networks (encoders, ``generate``, ``transfer``) run under
    autocast; the small geometry calls (``relative_motion``, ``edit``, ``pose_descriptor``) in
    float32.
    """

    AUTOCAST_CALLS = ("encode_source", "encode_driving", "generate", "transfer", "encode_codes")
    FLOAT32_CALLS = ("relative_motion", "edit", "pose_descriptor")

    def __init__(self, model, settings, device=None):
        self.model = model
        self.settings = settings
        self.device = torch.device(device) if device is not None else \
            next(model.parameters()).device

    def __getattr__(self, name):
        attribute = getattr(self.model, name)
        if name in self.AUTOCAST_CALLS:
            return self._wrapped(attribute, self.settings.autocast(self.device))
        if name in self.FLOAT32_CALLS:
            return self._wrapped(attribute, contextlib.nullcontext())
        return attribute

    def _wrapped(self, method, context):
        @functools.wraps(method)
        def call(*args, **kwargs):
            if self.settings.channels_last:
                args, kwargs = [channels_last(a) for a in args], \
                    {k: channels_last(v) for k, v in kwargs.items()}
            with torch.no_grad(), context:
                result = method(*args, **kwargs)
            return to_float32(result)
        return call

    def __repr__(self):
        return f"InferenceModel({type(self.model).__name__}, {self.settings.describe()})"


def prepare_inference(model, settings, device=None):
    """``model`` in evaluation mode with the layout and compile switches applied, wrapped so that
    every inference call runs under ``settings`` (see :class:`InferenceModel`)."""
    if isinstance(model, InferenceModel):
        model = model.model
    model.eval()
    prepare_model(model, settings)
    return InferenceModel(model, settings, device)


def unwrap(model):
    """The model itself, whether wrapped by :func:`prepare_inference` or not."""
    return model.model if isinstance(model, InferenceModel) else model


__all__ = ["PRECISIONS", "SPEED_KEYS", "SpeedSettings", "StepPrecision",
           "autocast_device_type", "to_float32", "full_precision", "channels_last", "networks",
           "prepare_model", "InferenceModel", "prepare_inference", "unwrap"]
