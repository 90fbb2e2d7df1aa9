"""Run directory, its lock, text and tensorboard logs, PNG visual grids and atomic checkpoints.

Only rank 0 of a distributed run writes (``Logger(..., enabled=False)`` on the other ranks).
A run folder is locked (:class:`RunLock`) while a process trains in it.
"""
import datetime
import json
import logging
import os
import socket
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

from atomic_files import OutputWriteError, failure_reason, remove_stale_temporaries
from checkpoint import CHECKPOINT_LATEST, save_checkpoint_atomic
from config import dump_config

try:
    import fcntl
except ImportError:  # not a POSIX system: run folders are not locked
    fcntl = None

LOCK_FILE = ".lock"
log = logging.getLogger(__name__)


class RunLockedError(RuntimeError):
    """Another process trains in this run folder; the message names it."""


def folder_error(folder, error):
    """An :class:`OutputWriteError` for a run folder that cannot be created or written."""
    return OutputWriteError(f"cannot write the run folder {folder}: "
                            f"{failure_reason(error, folder)}; choose a writable --log_dir")


class RunLock:
    """Exclusive lock of a run folder while a process trains in it: ``<run>/.lock`` held with
    ``flock``, holding the holder's pid, host, start time and command line.

    A second process that tries to lock the folder gets :class:`RunLockedError` naming the holder.
    The kernel drops the lock when the holder exits in any way (a kill included), so a lock is
    never stale; the file itself stays behind, harmless. Re-entrant within one process (``run.py``
    and ``train()`` both take it). On acquiring, temporary files a killed writer left in the folder
    are removed (no other process can be writing there). ``flock`` is reliable on local file
    systems and on NFS on Linux; on other systems (no ``fcntl``) folders are not locked.
    """

    _held = {}  # real path of the lock file -> [open file, count]

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)

    def acquire(self):
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            key = os.path.realpath(self.path)
            if key in self._held:
                self._held[key][1] += 1
                return self
            handle = open(self.path, "a+", encoding="utf-8")
        except OSError as error:
            raise folder_error(self.run_dir, error) from error
        if fcntl is None:
            log.warning("run folders cannot be locked on this system (no fcntl); do not train "
                        "twice in %s at once", self.run_dir)
        else:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip()
                handle.close()
                raise RunLockedError(
                    f"run folder {self.run_dir} is in use by another training process "
                    f"({describe_holder(holder)}); wait for it to finish or stop it, or choose "
                    "another --run_name") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(holder_record()) + "\n")
        handle.flush()
        self._held[key] = [handle, 1]
        removed = remove_stale_temporaries(self.run_dir)
        if removed:
            log.info("removed %d temporary file(s) a killed run left in %s: %s", len(removed),
                     self.run_dir, ", ".join(sorted(removed)))
        return self

    def release(self):
        key = os.path.realpath(self.path)
        entry = self._held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._held[key]
            handle = entry[0]
            handle.seek(0)
            handle.truncate()
            handle.close()  # closing drops the flock

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def holder_record():
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}


def describe_holder(text):
    try:
        record = json.loads(text)
        return (f"pid {record['pid']} on {record['host']} since {record['since']}, "
                f"command: {record['command']}")
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


class Logger:
    def __init__(self, log_dir, config=None, enabled=True):
        self.log_dir = log_dir
        self.enabled = enabled
        self._writer = None
        if not enabled:
            return
        try:
            os.makedirs(os.path.join(log_dir, "visuals"), exist_ok=True)
            if config is not None:
                dump_config(config, os.path.join(log_dir, "config.yaml"))
            self._log_file = open(os.path.join(log_dir, "log.txt"), "a", encoding="utf-8")
        except OSError as error:
            raise folder_error(log_dir, error) from error

    @property
    def writer(self):
        if self._writer is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(os.path.join(self.log_dir, "tensorboard"))
        return self._writer

    def log_scalars(self, step, scalars, prefix="train"):
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def log_epoch(self, epoch, mean_losses):
        """One line of mean losses per epoch in ``log.txt`` (and tensorboard)."""
        if not self.enabled:
            return
        text = " | ".join(f"{name} {value:.5f}" for name, value in sorted(mean_losses.items()))
        self._log_file.write(f"epoch {epoch:04d} | {text}\n")
        self._log_file.flush()
        self.log_scalars(epoch, mean_losses, prefix="epoch")

    def save_visuals(self, name, columns):
        """A PNG grid: one column per ``(title, B x 3 x H x W tensor)``, one row per sample."""
        if not self.enabled:
            return None
        grid = make_grid(columns)
        path = os.path.join(self.log_dir, "visuals", f"{name}.png")
        Image.fromarray(grid).save(path)
        return path

    def save_checkpoint(self, state, name=CHECKPOINT_LATEST):
        if not self.enabled:
            return None
        path = os.path.join(self.log_dir, name)
        save_checkpoint_atomic(state, path)
        return path

    def close(self):
        if self.enabled:
            self._log_file.close()
            if self._writer is not None:
                self._writer.close()


def to_uint8_image(tensor):
    """3 x H x W (or 1 x H x W) float in [0, 1] -> H x W x 3 uint8."""
    array = tensor.detach().float().clamp(0, 1).cpu().numpy()
    if array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    return (array.transpose(1, 2, 0) * 255.0).round().astype(np.uint8)


def make_grid(columns, max_rows=8, title_height=12):
    """Lay ``[(title, B x C x H x W)]`` out as columns, every image resized to the first's size."""
    if not columns:
        raise ValueError("make_grid needs at least one column")
    height, width = columns[0][1].shape[-2:]
    rows = min(max_rows, columns[0][1].shape[0])
    canvas = np.full((title_height + rows * height, len(columns) * width, 3), 255, np.uint8)
    for c, (title, images) in enumerate(columns):
        images = images.detach().float()
        if images.shape[-2:] != (height, width):
            images = torch.nn.functional.interpolate(images, size=(height, width), mode="bilinear",
                                                     align_corners=False)
        for r in range(min(rows, images.shape[0])):
            canvas[title_height + r * height:title_height + (r + 1) * height,
                   c * width:(c + 1) * width] = to_uint8_image(images[r])
    if not title_height:
        return canvas
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for c, (title, _) in enumerate(columns):
        draw.text((c * width + 2, 0), str(title)[: max(1, width // 6)], fill=(0, 0, 0))
    return np.asarray(image)
