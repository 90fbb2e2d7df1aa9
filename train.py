"""Model-agnostic training loop: optimizers per trainable part, MultiStepLR, resume, DDP, logging.

Read it top to bottom: ``train()`` builds optimizers from ``model.optimizer_groups()``, restores a
checkpoint if given, then for each batch runs the generator step and (if the model has one) the
discriminator step. It knows nothing about a specific model.
"""
import contextlib
import logging
import math
import os
from collections import Counter

import torch
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from checkpoint import (CHECKPOINT_LATEST, make_checkpoint, restore_model,
                        set_rng_state)
from datasets.frames_dataset import DatasetRepeater
from datasets.loader import DevicePrefetcher, make_loader
from logger import Logger, RunLock
from modules.precision import (SpeedSettings, StepPrecision, channels_last, prepare_model,
                               to_float32)
from modules.registry import checkpoint_for
from modules.sync_batchnorm import convert_sync_batchnorm

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced NaN or Inf; it stops without writing the bad state anywhere."""


class NonFiniteLossError(NonFiniteError):
    """A loss became NaN or Inf; training stops without overwriting the last good checkpoint."""


class NonFiniteStateError(NonFiniteError):
    """A parameter or buffer (e.g. a BatchNorm running variance) became NaN or Inf while the
    losses stayed finite; found before a checkpoint would have saved it."""


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


def recovery_advice(last_good):
    """Where to resume from after a non-finite value: ``last_good`` is ``(path, step)`` of the
    last checkpoint whose parameters and buffers were checked finite, or None."""
    if not last_good:
        return ("No checkpoint was written yet (none holds finite weights from this run); start "
                "again with a lower learning rate (--set train_params.lr_<group>=...)")
    path, step = last_good
    return (f"The last checkpoint checked finite is {path} (step {step}; every checkpoint is "
            "checked before it is written). Resume from it with --checkpoint and a lower learning "
            "rate (--set train_params.lr_<group>=...; the config's rates win over the "
            "checkpoint's); if the losses were already growing before that step (log.txt, "
            "tensorboard), resume from an earlier checkpoint_epoch_*.pth instead, or check the "
            "data of this batch")


def check_finite(losses, step, last_checkpoint):
    """Raise :class:`NonFiniteLossError` if a loss (a tensor or a number) is NaN or Inf.
    ``last_checkpoint``: ``(path, step)`` of the last checkpoint known finite, or None."""
    values = {name: float(value.detach() if torch.is_tensor(value) else value)
              for name, value in losses.items()}
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if bad:
        raise NonFiniteLossError(f"non-finite loss at iteration {step}: {bad}. Training stopped. "
                                 f"{recovery_advice(last_checkpoint)}.")


def nonfinite_entries(tensors):
    """Names of the floating-point tensors in ``{name: tensor}`` holding NaN or Inf (one
    device synchronization for all of them)."""
    floating = [(name, t) for name, t in tensors.items() if torch.is_floating_point(t) and t.numel()]
    if not floating:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in floating]).cpu()
    return [name for (name, _), ok in zip(floating, finite.tolist()) if not ok]


def check_model_finite(model, step, last_good, when):
    """Raise :class:`NonFiniteStateError` when a parameter or buffer holds NaN or Inf: losses
    can stay finite while, e.g., a BatchNorm running variance overflows, and that state must
    never reach a checkpoint."""
    bad = nonfinite_entries(dict(model.state_dict(keep_vars=False)))
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteStateError(f"non-finite values in the model's parameters or buffers at "
                                  f"iteration {step} ({when}): {shown}. Training stopped and this "
                                  f"state was not saved. {recovery_advice(last_good)}.")


def build_optimizers(model, train_params):
    """Adam per optimizer group of the model, each with ``train_params['lr_<group>']``."""
    return {name: torch.optim.Adam(params, lr=train_params[f"lr_{name}"],
                                   betas=tuple(train_params["adam_betas"]))
            for name, params in model.optimizer_groups().items()}


def train_step(net, model, optimizers, batch, step=0, last_checkpoint=None, precision=None,
               check=True):
    """One iteration: generator step (all non-discriminator groups), then the discriminator step.

    ``net`` is the model or its DDP wrapper. Returns ``(losses, generated)`` with detached outputs;
    the losses stay tensors on the device. ``precision`` (:class:`modules.precision.StepPrecision`,
    None = float32): the forward passes run under its autocast, backward passes and optimizer
    steps through its gradient scaler (fp16). ``check``: raise :class:`NonFiniteLossError` (naming
    ``step`` and ``last_checkpoint``) on a NaN/Inf loss now, which reads the losses on the host;
    the training loop passes False and checks them when it reads them anyway (:class:`LossLog`).
    """
    precision = precision or StepPrecision()
    with precision.autocast():
        losses, generated = net(batch, step="generator")
    if check:
        check_finite(losses, step, last_checkpoint)
    precision.backward(sum(losses.values()))
    for name, opt in optimizers.items():
        if name not in model.discriminator_groups:
            precision.step(opt)
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    generated = {k: v.detach() if torch.is_tensor(v) else v for k, v in generated.items()}
    if model.discriminator_groups:
        with precision.autocast():
            d_losses = net(batch, step="discriminator", generated=generated)
        if check:
            check_finite(d_losses, step, last_checkpoint)
        if d_losses:
            precision.backward(sum(d_losses.values()))
            for name in model.discriminator_groups:
                precision.step(optimizers[name])
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
        losses = {**losses, **d_losses}
    precision.update()
    return losses, generated


class LossLog:
    """The losses of every step, kept on the device until read: one host sync per read instead of
    one per loss per step (a sync stalls the CPU until the GPU has finished, so the next step's
    kernels cannot be queued meanwhile).

    ``add(step, losses)`` after each step; ``read()`` returns ``[(step, {name: float})]`` for the
    steps added since the last read, in order.
    """

    def __init__(self):
        self.pending = []                       # (step, names, 1-D tensor of the values)

    def __len__(self):
        return len(self.pending)

    def add(self, step, losses):
        values = torch.stack([value.detach().float().reshape(()) for value in losses.values()])
        self.pending.append((step, tuple(losses), values))

    def read(self):
        if not self.pending:
            return []
        flat = torch.cat([values for _, _, values in self.pending]).tolist()   # the one sync
        rows, start = [], 0
        for step, names, _ in self.pending:
            rows.append((step, dict(zip(names, flat[start:start + len(names)]))))
            start += len(names)
        self.pending = []
        return rows


def apply_optimizer_settings(optimizers, schedulers, train_params, epoch):
    """The config's learning rates, Adam betas and schedule (milestones, decay) win over a resumed
    checkpoint's: each group's learning rate becomes ``lr_<group> * lr_decay ** (milestones
    passed)``.
    Returns a description of what changed (empty when nothing did)."""
    changes = []
    betas = tuple(train_params["adam_betas"])
    passed = sum(1 for m in train_params["epoch_milestones"] if m <= epoch)
    for name, optimizer in optimizers.items():
        lr = train_params[f"lr_{name}"]
        scheduler = schedulers[name]
        if list(scheduler.base_lrs) != [lr] * len(scheduler.base_lrs):
            changes.append(f"lr_{name} {scheduler.base_lrs[0]:g} -> {lr:g}")
        if tuple(optimizer.param_groups[0]["betas"]) != betas:
            changes.append(f"{name} adam_betas {list(optimizer.param_groups[0]['betas'])} -> "
                           f"{list(betas)}")
        if sorted(scheduler.milestones.elements()) != sorted(train_params["epoch_milestones"]):
            changes.append(f"{name} epoch_milestones {sorted(scheduler.milestones.elements())} -> "
                           f"{sorted(train_params['epoch_milestones'])}")
        if scheduler.gamma != train_params["lr_decay"]:
            changes.append(f"{name} lr_decay {scheduler.gamma:g} -> {train_params['lr_decay']:g}")
        scheduler.base_lrs = [lr] * len(optimizer.param_groups)
        scheduler.milestones = Counter(train_params["epoch_milestones"])
        scheduler.gamma = train_params["lr_decay"]
        for group in optimizer.param_groups:
            group.update(lr=lr * train_params["lr_decay"] ** passed, initial_lr=lr, betas=betas)
    return changes


def train(config, model, dataset, log_dir, checkpoint_path=None, device="cpu", rank=0,
          world_size=1, seed=0, finetune_from=None):
    """Train ``model`` on ``dataset``, writing into ``log_dir``. ``checkpoint_path`` resumes a run
    exactly (weights, optimizers, schedule, data position, random state); ``finetune_from``
    starts a new run from a checkpoint's weights only.

    A single process locks ``log_dir`` while it trains (:class:`logger.RunLock`); with several
    processes ``run.py`` holds the lock for them."""
    lock = RunLock(log_dir) if rank == 0 and world_size == 1 else contextlib.nullcontext()
    with lock:
        return _train(config, model, dataset, log_dir, checkpoint_path, device, rank, world_size,
                      seed, finetune_from)


def load_resumable(config, checkpoint_path, device):
    """A checkpoint to resume or fine-tune from (ours or a reference implementation's, converted),
    refused when its weights or buffers are not finite."""
    checkpoint = checkpoint_for(config, checkpoint_path, device)
    bad = nonfinite_entries(checkpoint["state_dict"])
    if bad:
        raise NonFiniteStateError(f"checkpoint {checkpoint_path} holds non-finite values in "
                                  f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
                                  "resuming it cannot recover. Resume from an earlier "
                                  "checkpoint_epoch_*.pth of the run instead")
    return checkpoint


def _train(config, model, dataset, log_dir, checkpoint_path, device, rank, world_size, seed,
           finetune_from):
    train_params = config["train_params"]
    distributed = world_size > 1
    if distributed:  # batch statistics over the global batch (SAFA trains with synchronized BN)
        model = convert_sync_batchnorm(model, device)
    model.to(device).train()
    speed = SpeedSettings.from_params(train_params)
    prepare_model(model, speed)                      # channels_last, compile (modules/precision.py)
    precision = StepPrecision(speed, device)
    optimizers = build_optimizers(model, train_params)
    schedulers = {name: torch.optim.lr_scheduler.MultiStepLR(
        opt, train_params["epoch_milestones"], gamma=train_params["lr_decay"])
        for name, opt in optimizers.items()}

    start_epoch, step, skip_batches = 0, 0, 0
    last_good = None  # (path, step) of the last checkpoint known to hold finite values
    path = checkpoint_path or finetune_from
    checkpoint = load_resumable(config, path, device) if path else None
    if checkpoint is not None:
        restore_model(model, checkpoint, path)
    if checkpoint_path and "optimizers" in checkpoint:   # else weights only: a fresh run
        for name, opt in optimizers.items():  # a group new to this config starts fresh
            if name in checkpoint["optimizers"]:
                opt.load_state_dict(checkpoint["optimizers"][name])
                schedulers[name].load_state_dict(checkpoint["schedulers"][name])
        start_epoch, step = checkpoint["epoch"], checkpoint["step"]
        skip_batches = checkpoint["batch_in_epoch"]
        last_good = (checkpoint_path, step)
        set_rng_state(checkpoint["rng"])
        changes = apply_optimizer_settings(optimizers, schedulers, train_params, start_epoch)
        if changes and rank == 0:
            log.info("resuming with the config's optimizer settings: %s", "; ".join(changes))
    elif checkpoint is not None and rank == 0:
        log.info("fine-tuning from the weights of %s (new optimizers, epoch 0)", path)
    model.prepare_training(dataset)

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
    loader = make_loader(repeated, batch_size, sampler, train_params["num_workers"], device, seed,
                         train_params["prefetch_factor"])
    batches = DevicePrefetcher(loader, device, channels_last if speed.channels_last else None)
    logger = Logger(log_dir, config, enabled=rank == 0)
    if rank == 0 and speed != SpeedSettings():
        log.info("training in %s", speed.describe())
    max_steps = train_params["max_steps"]
    steps_per_epoch = len(sampler) // batch_size

    history, loss_log, totals, count = [], LossLog(), {}, 0

    def read_losses(progress=None):
        """Read the losses kept on the device (one host sync): check them, log every step's,
        add them to the epoch's sums; the progress bar shows their mean over the steps read."""
        nonlocal count
        rows = loss_log.read()
        for at_step, values in rows:
            check_finite(values, at_step, last_good)
            history.append(values)
            logger.log_scalars(at_step, values)
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v
            count += 1
        if progress is not None and rows:
            means = {k: sum(v[k] for _, v in rows) / len(rows) for k in rows[-1][1]}
            progress.set_postfix({"mean of last steps": len(rows),
                                  **{k: f"{v:.3f}" for k, v in means.items()}}, refresh=False)

    def save(epoch, batch_in_epoch, name=CHECKPOINT_LATEST):
        """Every rank checks its losses so far and its parameters and buffers (identical
        under DDP, so all stop together); rank 0 then writes the checkpoint."""
        nonlocal last_good
        read_losses()                                   # no checkpoint after a non-finite loss
        check_model_finite(model, step, last_good, f"before saving {name}")
        state = make_checkpoint(model, optimizers, schedulers, epoch, step, batch_in_epoch, config)
        path = logger.save_checkpoint(state, name)
        last_good = (path, step) if path else last_good
        return path

    for epoch in range(start_epoch, train_params["num_epochs"]):
        sampler.set_epoch(epoch)
        sampler.skip = skip_batches * batch_size
        totals.clear()
        count = 0
        progress = tqdm(batches, desc=f"epoch {epoch}", disable=rank != 0, dynamic_ncols=True,
                        initial=skip_batches, total=steps_per_epoch)
        for batch_index, batch in enumerate(progress, start=skip_batches):
            losses, generated = train_step(net, model, optimizers, batch, step, last_good,
                                           precision, check=False)
            step += 1
            loss_log.add(step, losses)
            if step % max(1, train_params["log_every_steps"]) == 0:
                read_losses(progress)
            if train_params["visual_every_steps"] and step % train_params["visual_every_steps"] == 0:
                logger.save_visuals(f"step_{step:07d}",
                                    model.visuals(batch, to_float32(generated)))
            if max_steps is not None and step >= max_steps:
                save(epoch, batch_index + 1)
                logger.close()
                return history
            if train_params["checkpoint_every_steps"] and \
                    step % train_params["checkpoint_every_steps"] == 0:
                save(epoch, batch_index + 1)
        skip_batches = 0
        read_losses(progress)
        for sched in schedulers.values():
            sched.step()
        if count:
            logger.log_epoch(epoch, {k: v / count for k, v in totals.items()})
            logger.save_visuals(f"epoch_{epoch:04d}",
                                model.visuals(batch, to_float32(generated)))
        save(epoch + 1, 0)  # checks losses, parameters and buffers first: the end-of-epoch check
        if (epoch + 1) % train_params["checkpoint_freq"] == 0:
            save(epoch + 1, 0, name=f"checkpoint_epoch_{epoch + 1:04d}.pth")
    logger.close()
    return history



def run_train(args, config, run_dir, device, rank=0, world_size=1):
    """``--mode train`` in one process (run.py starts one per device)."""
    from datasets.frames_dataset import build_dataset
    from modules.registry import build_model
    torch.manual_seed(args.seed)
    dataset = build_dataset(config, is_train=True)
    model = build_model(config, training=True)
    resume, finetune = resume_or_finetune(run_dir, args.checkpoint)
    if rank == 0:
        what = f"resuming {resume}" if resume else (f"fine-tuning from {finetune}" if finetune
                                                    else "a new run")
        print(f"training {config['model']} on {len(dataset)} training entries; {what}; "
              f"run folder {run_dir}")
    train(config, model, dataset, run_dir, checkpoint_path=resume, device=device, rank=rank,
          world_size=world_size, seed=args.seed, finetune_from=finetune)
    return run_dir


def resume_or_finetune(run_dir, checkpoint):
    """``(resume_path, finetune_path)``: a run folder with a checkpoint of its own resumes it
    (a different ``--checkpoint`` is then an error); a ``--checkpoint`` from the run folder itself
    resumes; one from elsewhere starts this new run from its weights."""
    latest = os.path.join(run_dir, CHECKPOINT_LATEST)
    inside = checkpoint and os.path.dirname(os.path.abspath(checkpoint)) == os.path.abspath(run_dir)
    if os.path.isfile(latest):
        if checkpoint and not inside:
            raise ValueError(f"run folder {run_dir} already has a checkpoint; to resume it drop "
                             f"--checkpoint, to fine-tune from {checkpoint} choose a new --run_name")
        return (checkpoint if inside else latest), None
    if inside:
        return checkpoint, None
    return None, checkpoint
