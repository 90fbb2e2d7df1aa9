"""Logger: run folder contents, log lines, visual grids, atomic checkpoints (also under SIGKILL)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import yaml

from checkpoint import load_checkpoint, save_checkpoint_atomic
from logger import Logger, make_grid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_log_dir_config_log_lines_and_grid(tmp_path):
    logger = Logger(str(tmp_path / "run"), config={"model": "x", "train_params": {"a": 1}})
    logger.log_epoch(0, {"perceptual": 1.5, "gan": 0.25})
    logger.log_epoch(1, {"perceptual": 1.0, "gan": 0.5})
    images = torch.rand(2, 3, 16, 16)
    path = logger.save_visuals("step_1", [("source", images), ("mask", images[:, :1])])
    logger.close()
    assert yaml.safe_load(open(tmp_path / "run" / "config.yaml"))["model"] == "x"
    lines = open(tmp_path / "run" / "log.txt").read().splitlines()
    assert lines == ["epoch 0000 | gan 0.25000 | perceptual 1.50000",
                     "epoch 0001 | gan 0.50000 | perceptual 1.00000"]
    from PIL import Image
    grid = np.asarray(Image.open(path))
    assert grid.shape == (12 + 2 * 16, 2 * 16, 3)
    assert os.listdir(tmp_path / "run" / "tensorboard")


def test_grid_places_images_in_columns():
    a, b = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)
    grid = make_grid([("a", a), ("b", b)], title_height=0)
    assert (grid[:, :8] == 0).all() and (grid[:, 8:] == 255).all()


def test_disabled_logger_writes_nothing(tmp_path):
    logger = Logger(str(tmp_path / "rank1"), config={"a": 1}, enabled=False)
    logger.log_epoch(0, {"x": 1.0})
    assert logger.save_checkpoint({"x": torch.zeros(1)}) is None
    assert not (tmp_path / "rank1").exists()


def test_checkpoint_roundtrip_weights_only(tmp_path):
    state = {"state_dict": {"w": torch.arange(4.0)}, "epoch": 3, "rng": {"python": [1, 2]}}
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint_atomic(state, path)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and torch.equal(loaded["state_dict"]["w"], torch.arange(4.0))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp_")]
    (tmp_path / "truncated.pth").write_bytes(open(path, "rb").read()[:40])
    with pytest.raises(RuntimeError, match="truncated.pth"):
        load_checkpoint(str(tmp_path / "truncated.pth"))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "none.pth"))


def test_checkpoint_never_corrupt_when_killed_mid_write(tmp_path):
    """A process killed while rewriting a large checkpoint leaves the previous one intact."""
    path = str(tmp_path / "checkpoint_latest.pth")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {REPO!r})
        from checkpoint import save_checkpoint_atomic
        save_checkpoint_atomic({{"version": 0, "w": torch.zeros(10)}}, {path!r})
        print("first", flush=True)
        version = 1
        while True:
            save_checkpoint_atomic({{"version": version, "w": torch.randn(40_000_000)}}, {path!r})
            version += 1
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "first"
    time.sleep(1.5)  # inside one of the ~160 MB writes
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = load_checkpoint(path)
    assert state["version"] >= 0
    assert state["w"].numel() == (10 if state["version"] == 0 else 40_000_000)
