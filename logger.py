"""Run directory, text and tensorboard logs, PNG visual grids and atomic checkpoints.

Only rank 0 of a distributed run writes (``Logger(..., enabled=False)`` on the other ranks).
"""
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from checkpoint import CHECKPOINT_LATEST, save_checkpoint_atomic
from config import dump_config


class Logger:
    def __init__(self, log_dir, config=None, enabled=True):
        self.log_dir = log_dir
        self.enabled = enabled
        self._writer = None
        if not enabled:
            return
        os.makedirs(os.path.join(log_dir, "visuals"), exist_ok=True)
        if config is not None:
            dump_config(config, os.path.join(log_dir, "config.yaml"))
        self._log_file = open(os.path.join(log_dir, "log.txt"), "a", encoding="utf-8")

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
