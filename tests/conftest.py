"""Shared fixtures: tiny video datasets written in temporary folders in every supported layout."""
import os

import imageio.v2 as imageio
import numpy as np
import pytest
import torch


def moving_square_frames(num_frames=6, size=32, channels=3, seed=0):
    """Frames of a bright square moving over a textured background (uint8, T x H x W x C)."""
    rng = np.random.RandomState(seed)
    ramp = np.linspace(0, 1, size)
    color = rng.uniform(20, 90, size=channels)
    # smooth background, so lossy codecs keep it close to the original
    background = (color * (0.5 + 0.5 * np.add.outer(ramp, ramp)[..., None] / 2)).astype(np.uint8)
    frames = []
    for t in range(num_frames):
        frame = background.copy()
        x = 2 + (t * 3) % (size - 10)
        frame[8:16, x:x + 8] = 230
        frames.append(frame)
    return np.stack(frames)


def write_video(path, frames, fps=10):
    """Write frames in the layout the path implies: folder, stacked image, or video file."""
    if path.endswith((".png", ".jpg")):
        imageio.imwrite(path, np.concatenate(list(frames), axis=1))
    elif path.endswith((".mp4", ".mov")):
        writer = imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1,
                                    ffmpeg_log_level="error")
        for f in frames:
            writer.append_data(f)
        writer.close()
    elif path.endswith(".gif"):
        imageio.mimsave(path, list(frames), duration=1000 / fps)
    else:
        os.makedirs(path, exist_ok=True)
        for i, f in enumerate(frames):
            imageio.imwrite(os.path.join(path, f"{i:07d}.png"), f)
    return path


@pytest.fixture
def tiny_dataset(tmp_path):
    """A FOMM-layout dataset with train/ and test/ videos of several identities, 32x32."""
    root = tmp_path / "data"
    for split, ids in (("train", ["id001", "id002", "id003"]), ("test", ["id004"])):
        (root / split).mkdir(parents=True)
        for i, identity in enumerate(ids):
            for clip in range(2):
                name = f"{identity}#vid{clip}#000"
                write_video(str(root / split / name), moving_square_frames(6, 32, seed=i * 7 + clip))
    return str(root)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic talking-head dataset (32x32) with landmark and FLAME sidecars."""
    from datasets.synthetic import ensure_synthetic_dataset
    root = str(tmp_path_factory.mktemp("synthetic") / "synthetic-32")
    return ensure_synthetic_dataset(root, size=32, train_videos=4, test_videos=2, frames=6, seed=3)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny-tensor tests: no OpenMP contention on a busy
    2-core machine, and the thread count the reference parity numbers were made with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def face_detector():
    """The face detector the crop path uses (dlib's HOG here); tests needing one skip without."""
    from datasets.cropped_video import load_face_detector
    found = load_face_detector()
    if not found:
        pytest.skip(f"no face detector: {found.reason}")
    return found


@pytest.fixture(scope="session")
def synthetic_portrait():
    """A 208 x 256 synthetic portrait photo with the face right of centre, and its landmarks."""
    from datasets.synthetic_photos import portrait_photo
    return portrait_photo()


@pytest.fixture(scope="session")
def drifting_frames():
    """12 frames (176 x 144) of a synthetic face drifting left to right, and its landmarks."""
    from datasets.synthetic_photos import drifting_clip
    return drifting_clip(frames=12)
