"""The model contract, checked for every registered model (as timm tests every model).

A model gets all of this by registering and naming its tiny config (``tiny_config``): the test
builds each model once from that config, on a small synthetic dataset in the config's own frame
size, and checks what train.py, reconstruction.py, animate.py and evaluation/ rely on.
"""
import os

import pytest
import torch

from checkpoint import make_checkpoint, save_checkpoint_atomic
from config import CONFIG_DIR
from datasets.frames_dataset import build_dataset, collate_items
from datasets.synthetic import ensure_synthetic_dataset
from modules.registry import build_model, get_model_class, load_config, registered_models
from train import build_optimizers, train_step

MODELS = registered_models()
BATCH = 2
OVERFIT_STEPS = 12
# losses of the adversarial game: not expected to fall while the discriminator learns
ADVERSARIAL = ("generator_gan", "feature_matching", "discriminator_gan")


@pytest.fixture(scope="session")
def synthetic_roots(tmp_path_factory):
    """One small synthetic dataset per frame size, with every sidecar."""
    roots = {}

    def root_for(size):
        if size not in roots:
            path = str(tmp_path_factory.mktemp(f"contract-{size}") / "synthetic")
            roots[size] = ensure_synthetic_dataset(path, size=size, train_videos=2, test_videos=1,
                                                   frames=4, seed=5)
        return roots[size]
    return root_for


class Bench:
    """A model built once from its tiny config, with a fixed training batch."""

    def __init__(self, name, root_for):
        self.name = name
        cls = get_model_class(name)
        assert cls.tiny_config, f"model {name!r} names no tiny config (class attribute tiny_config)"
        size = load_config(cls.tiny_config)["dataset_params"]["frame_shape"][0]
        self.config = load_config(cls.tiny_config, [f"dataset_params.root_dir={root_for(size)}",
                                                    "dataset_params.synthetic=null"])
        torch.manual_seed(0)
        self.model = build_model(self.config, training=True)
        dataset = build_dataset(self.config, is_train=True)
        self.batch = collate_items([dataset[(i % len(dataset), i)] for i in range(BATCH)])
        self.size = tuple(self.config["dataset_params"]["frame_shape"][:2])


@pytest.fixture(scope="module", params=MODELS)
def bench(request, synthetic_roots):
    return Bench(request.param, synthetic_roots)


def animating(bench):
    if not bench.model.animates:
        pytest.skip(f"{bench.name} does not animate (it pretrains a part)")
    return bench.model


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("name", MODELS)
def test_tiny_config_validates_and_is_tiny(name):
    cls = get_model_class(name)
    assert cls.tiny_config and os.path.isfile(os.path.join(CONFIG_DIR, cls.tiny_config))
    config = load_config(cls.tiny_config)
    assert config["model"] == name
    assert config["dataset_params"]["frame_shape"][0] <= 64       # CPU-sized
    assert cls.driving_signal in ("frames", "landmarks", "codes")


# ----------------------------------------------------------------------------- training
def test_losses_are_finite_and_reach_every_optimizer_group(bench):
    model = bench.model.train()
    groups = model.optimizer_groups()
    model.zero_grad(set_to_none=True)
    losses, generated = model.generator_step(bench.batch)
    assert losses, "the generator step returned no loss"
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), (name, value)
    sum(losses.values()).backward()
    for group, params in groups.items():
        if group in model.discriminator_groups:
            continue
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), \
            f"no gradient reaches optimizer group {group!r}"
    model.zero_grad(set_to_none=True)
    detached = {k: v.detach() if torch.is_tensor(v) else v for k, v in generated.items()}
    d_losses = model.discriminator_step(bench.batch, detached)
    if not model.discriminator_groups:
        assert d_losses == {}
        return
    assert d_losses and all(torch.isfinite(v) for v in d_losses.values())
    sum(d_losses.values()).backward()
    discriminator = {id(p) for g in model.discriminator_groups for p in groups[g]}
    for name, param in model.named_parameters():
        touched = param.grad is not None and param.grad.abs().sum() > 0
        if id(param) not in discriminator:
            assert not touched, f"the discriminator step changed the gradient of {name}"
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for g in model.discriminator_groups for p in groups[g])
    model.zero_grad(set_to_none=True)


def non_adversarial_loss(model, batch):
    """The generator step's non-adversarial losses, with the same random draws (dropout,
    equivariance transforms) every time it is measured."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        losses, _ = model.generator_step(batch)
    return sum(float(v) for k, v in losses.items() if k not in ADVERSARIAL)


def test_overfits_a_fixed_batch(bench):
    """The real training step (train.train_step) on one batch, at the config's learning rates:
    the non-adversarial losses of that batch fall."""
    torch.manual_seed(1)
    model = build_model(bench.config, training=True)
    model.prepare_training(build_dataset(bench.config, is_train=True))
    optimizers = build_optimizers(model, bench.config["train_params"])
    before = non_adversarial_loss(model, bench.batch)
    for step in range(OVERFIT_STEPS):
        train_step(model, model, optimizers, bench.batch, step)
    after = non_adversarial_loss(model, bench.batch)
    assert after < 0.85 * before, (before, after)


# ----------------------------------------------------------------------------- inference
@torch.no_grad()
def test_generate_absolute_and_relative_with_a_batch_1_source(bench):
    model = animating(bench).eval()
    source = bench.batch["source"][:1]
    driving = bench.batch["driving"]
    source_state = model.encode_source(source)
    driving_state = model.encode_driving(driving)
    reference_state = model.encode_driving(driving[:1])
    absolute = model.generate(source_state, driving_state)["prediction"]
    relative = model.generate(source_state, driving_state, reference_state, relative=True,
                              adapt_scale=True)["prediction"]
    for prediction in (absolute, relative):
        assert prediction.shape == (BATCH, 3, *bench.size)
        assert torch.isfinite(prediction).all() and prediction.min() >= 0 and prediction.max() <= 1
    # zero relative motion (driving = reference) is the source driven by itself
    still = model.generate(source_state, reference_state, reference_state,
                           relative=True)["prediction"]
    itself = model.generate(source_state, model.encode_driving(source))["prediction"]
    torch.testing.assert_close(still, itself, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="reference_state"):
        model.generate(source_state, driving_state, relative=True)
    three = model.encode_source(torch.cat([source] * 3))
    with pytest.raises(ValueError, match="batch size 3"):
        model.generate(three, driving_state)


@torch.no_grad()
def test_pose_descriptor_and_visuals(bench):
    model = bench.model.eval()
    if model.animates:
        descriptor = model.pose_descriptor(model.encode_driving(bench.batch["driving"]))
        assert descriptor.dim() == 2 and descriptor.shape[0] == BATCH
        assert torch.isfinite(descriptor).all()
    _, generated = model.generator_step(bench.batch)
    columns = model.visuals(bench.batch, generated)
    assert columns
    for title, image in columns:
        assert isinstance(title, str) and image.shape[0] == BATCH and image.shape[1] == 3, title
        assert image.min() >= 0 and image.max() <= 1 and not image.requires_grad, title


def test_checkpoint_round_trip(bench, tmp_path):
    model = bench.model.eval()
    optimizers = build_optimizers(model, bench.config["train_params"])
    schedulers = {name: torch.optim.lr_scheduler.MultiStepLR(opt, [1]) for name, opt in
                  optimizers.items()}
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint_atomic(make_checkpoint(model, optimizers, schedulers, 0, 0, 0, bench.config),
                           path)
    restored = build_model(bench.config, path)
    assert not restored.training
    own, loaded = model.state_dict(), restored.state_dict()
    assert own.keys() == loaded.keys()
    assert all(torch.equal(own[k], loaded[k]) for k in own)


@torch.no_grad()
def test_cached_source_entries_change_no_result(bench):
    """What encode_source computes once per source (e.g. the generator's encoder features) gives
    the same frames as recomputing it for every driving frame."""
    model = animating(bench).eval()
    state = model.encode_source(bench.batch["source"][:1])
    if "features" not in state:
        pytest.skip(f"{bench.name} caches nothing beyond its inputs")
    uncached = {k: v for k, v in state.items() if k != "features"}
    driving = model.encode_driving(bench.batch["driving"])
    torch.testing.assert_close(model.generate(state, driving)["prediction"],
                               model.generate(uncached, driving)["prediction"])


def test_one_bf16_channels_last_training_step(bench):
    """The speed switches (modules/precision.py) work for the model: one real training step in
    bf16 autocast with channels-last tensors gives finite losses within 5% of the same float32
    step's and changes the weights. Only the perceptual pyramid's 1/4 level is kept here, since
    bf16 convolutions are slow on CPUs without bf16 instructions."""
    import copy
    from modules.precision import SpeedSettings, StepPrecision, channels_last, prepare_model
    config = copy.deepcopy(bench.config)
    # mg3dmm's style loss (eq. 9) needs the full-resolution level instead
    config["train_params"]["scales"] = [1] if config["train_params"]["loss_weights"].get("style") \
        else [0.25]
    results = {}
    for precision, layout in (("fp32", False), ("bf16", True)):
        torch.manual_seed(1)
        model = build_model(config, training=True)
        prepare_model(model, SpeedSettings(precision, channels_last=layout))
        optimizers = build_optimizers(model, config["train_params"])
        before = [p.detach().clone() for p in model.parameters()]
        batch = channels_last(bench.batch) if layout else bench.batch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            losses, _ = train_step(model, model, optimizers, batch, 0,
                                   precision=StepPrecision(precision))
        results[precision] = {k: float(v.detach()) for k, v in losses.items()}
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for name, value in results["fp32"].items():
        # the hinge GAN terms are means of signed scores that cancel to near zero: their
        # bf16 error is absolute (about 1e-2 here), not relative to the small mean
        tolerance = 0.02 if name in ADVERSARIAL else 1e-3
        assert results["bf16"][name] == pytest.approx(value, rel=0.05, abs=tolerance), name
