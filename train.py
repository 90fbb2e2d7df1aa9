"""Model-agnostic training loop: optimizers per trainable part, MultiStepLR, resume, DDP, logging.

Read it top to bottom: ``train()`` builds optimizers from ``model.optimizer_groups()``, restores a
checkpoint if given, then for each batch runs the generator step and (if the model has one) the
discriminator step. It knows nothing about a specific model.
"""
import random

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from datasets.frames_dataset import DatasetRepeater
from logger import CHECKPOINT_LATEST, Logger, load_checkpoint
from modules.sync_batchnorm import convert_sync_batchnorm


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or Inf; training stops without overwriting the last good checkpoint."""


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose items carry a per-item seed and that can skip a prefix of an epoch.

    Yields ``(index, seed)``: the dataset draws its random frame pair and augmentation from
    ``seed``, so the data of step N is the same whether or not the run was interrupted before it.
    """

    def __init__(self, dataset, num_replicas=1, rank=0, seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.skip = 0

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        seeds = torch.randint(0, 2 ** 31 - 1, (len(order),), generator=generator).tolist()
        mine = list(zip(order, seeds))[:self.total_size][self.rank:self.total_size:self.num_replicas]
        return iter(mine[self.skip:])


def wrap_distributed(model, device):
    """DDP around the whole model. Each step's forward uses only some parameters (the
    discriminator step leaves the generator out), hence ``find_unused_parameters``; BatchNorm
    statistics are synchronized by the converted layers, not by broadcasting buffers."""
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if torch.device(device).type == "cuda" else None,
        find_unused_parameters=True, broadcast_buffers=False)


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


def check_finite(losses, step, last_checkpoint):
    bad = {name: float(value) for name, value in losses.items() if not torch.isfinite(value).all()}
    if bad:
        where = last_checkpoint or "(none written yet)"
        raise NonFiniteLossError(
            f"non-finite loss at iteration {step}: {bad}. Training stopped; the last good "
            f"checkpoint is {where}. Resume from it with --checkpoint, e.g. with a lower learning "
            "rate (--set train_params.lr_generator=...), or check the data of this batch.")


def move_to(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch


def build_optimizers(model, train_params):
    """Adam per optimizer group of the model, each with ``train_params['lr_<group>']``."""
    return {name: torch.optim.Adam(params, lr=train_params[f"lr_{name}"],
                                   betas=tuple(train_params["adam_betas"]))
            for name, params in model.optimizer_groups().items()}


def train_step(net, model, optimizers, batch, step=0, last_checkpoint=None):
    """One iteration: generator step (all non-discriminator groups), then the discriminator step.

    ``net`` is the model or its DDP wrapper. Returns ``(losses, generated)`` with detached outputs.
    """
    losses, generated = net(batch, step="generator")
    check_finite(losses, step, last_checkpoint)
    sum(losses.values()).backward()
    for name, opt in optimizers.items():
        if name not in model.discriminator_groups:
            opt.step()
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    generated = {k: v.detach() if torch.is_tensor(v) else v for k, v in generated.items()}
    if model.discriminator_groups:
        d_losses = net(batch, step="discriminator", generated=generated)
        check_finite(d_losses, step, last_checkpoint)
        if d_losses:
            sum(d_losses.values()).backward()
            for name in model.discriminator_groups:
                optimizers[name].step()
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
        losses = {**losses, **d_losses}
    return losses, generated


def make_checkpoint(model, optimizers, schedulers, epoch, step, batch_in_epoch, config):
    return {"model": model.name, "model_params": config["model_params"],
            "state_dict": model.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
            "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, "rng": rng_state()}


def restore_model(model, checkpoint, path):
    """Load a checkpoint's weights, refusing one of another model or an incompatible config."""
    if checkpoint.get("model") != model.name:
        raise ValueError(f"checkpoint {path} holds a {checkpoint.get('model')!r} model but the "
                         f"config selects {model.name!r}; use that model's config")
    own = model.state_dict()
    state = checkpoint["state_dict"]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    resized = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or resized:
        detail = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for label, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("shape differs", resized)) if keys)
        raise ValueError(f"checkpoint {path} does not fit this config's {model.name} model "
                         f"({detail}); it was trained with other model_params - use the config "
                         "saved next to it (config.yaml in its log dir)")
    model.load_state_dict(state)


def train(config, model, dataset, log_dir, checkpoint_path=None, device="cpu", rank=0,
          world_size=1, seed=0, verbose=False):
    train_params = config["train_params"]
    distributed = world_size > 1
    if distributed:  # batch statistics over the global batch (SAFA trains with synchronized BN)
        model = convert_sync_batchnorm(model, device)
    model.to(device)
    optimizers = build_optimizers(model, train_params)
    schedulers = {name: torch.optim.lr_scheduler.MultiStepLR(
        opt, train_params["epoch_milestones"], gamma=train_params["lr_decay"])
        for name, opt in optimizers.items()}

    start_epoch, step, skip_batches = 0, 0, 0
    if checkpoint_path:
        checkpoint = load_checkpoint(checkpoint_path, map_location=device)
        restore_model(model, checkpoint, checkpoint_path)
        for name, opt in optimizers.items():  # a group new to this config starts fresh
            if name in checkpoint["optimizers"]:
                opt.load_state_dict(checkpoint["optimizers"][name])
                schedulers[name].load_state_dict(checkpoint["schedulers"][name])
        start_epoch, step = checkpoint["epoch"], checkpoint["step"]
        skip_batches = checkpoint["batch_in_epoch"]
        set_rng_state(checkpoint["rng"])

    net = wrap_distributed(model, device) if distributed else model

    repeated = DatasetRepeater(dataset, train_params["num_repeats"])
    # train_params.batch_size is the global batch (as FOMM's DataParallel split it), shared by the
    # processes, so a config means the same optimization on 1 or 8 GPUs.
    if train_params["batch_size"] % world_size:
        raise ValueError(f"train_params.batch_size {train_params['batch_size']} is not divisible by "
                         f"the {world_size} processes; choose a multiple of {world_size}")
    batch_size = train_params["batch_size"] // world_size
    if len(repeated) < train_params["batch_size"]:
        raise ValueError(f"dataset has {len(repeated)} items per epoch (videos x num_repeats) but "
                         f"one step needs {train_params['batch_size']}; lower "
                         "train_params.batch_size or raise num_repeats")
    sampler = ResumableSampler(repeated, world_size, rank, seed)
    loader = DataLoader(repeated, batch_size=batch_size, sampler=sampler, drop_last=True,
                        num_workers=train_params["num_workers"], pin_memory=str(device) != "cpu",
                        generator=torch.Generator().manual_seed(seed),
                        persistent_workers=False)
    logger = Logger(log_dir, config, enabled=rank == 0)
    last_checkpoint = checkpoint_path
    max_steps = train_params["max_steps"]
    steps_per_epoch = len(sampler) // batch_size

    def save(epoch, batch_in_epoch, name=CHECKPOINT_LATEST):
        nonlocal last_checkpoint
        state = make_checkpoint(model, optimizers, schedulers, epoch, step, batch_in_epoch, config)
        path = logger.save_checkpoint(state, name)
        last_checkpoint = path or last_checkpoint
        return path

    history = []
    for epoch in range(start_epoch, train_params["num_epochs"]):
        sampler.set_epoch(epoch)
        sampler.skip = skip_batches * batch_size
        totals, count = {}, 0
        progress = tqdm(loader, desc=f"epoch {epoch}", disable=rank != 0, dynamic_ncols=True,
                        initial=skip_batches, total=steps_per_epoch)
        for batch_index, batch in enumerate(progress, start=skip_batches):
            batch = move_to(batch, device)
            losses, generated = train_step(net, model, optimizers, batch, step, last_checkpoint)
            step += 1
            values = {k: float(v.detach()) for k, v in losses.items()}
            history.append(values)
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v
            count += 1
            progress.set_postfix({k: f"{v:.3f}" for k, v in values.items()}, refresh=False)
            logger.log_scalars(step, values)
            if train_params["visual_every_steps"] and step % train_params["visual_every_steps"] == 0:
                logger.save_visuals(f"step_{step:07d}", model.visuals(batch, generated))
            if max_steps is not None and step >= max_steps:
                save(epoch, batch_index + 1)
                logger.close()
                return history
            if train_params["checkpoint_every_steps"] and \
                    step % train_params["checkpoint_every_steps"] == 0:
                save(epoch, batch_index + 1)
        skip_batches = 0
        for sched in schedulers.values():
            sched.step()
        if count:
            logger.log_epoch(epoch, {k: v / count for k, v in totals.items()})
            logger.save_visuals(f"epoch_{epoch:04d}", model.visuals(batch, generated))
        save(epoch + 1, 0)
        if (epoch + 1) % train_params["checkpoint_freq"] == 0:
            save(epoch + 1, 0, name=f"checkpoint_epoch_{epoch + 1:04d}.pth")
    logger.close()
    return history

