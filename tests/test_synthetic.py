"""The synthetic talking-head dataset: layout, sidecars, identities, landmarks, caching, speed."""
import json
import os
import re
import time

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datasets import synthetic
from datasets.synthetic import (TalkingHeadRenderer, ensure_synthetic_dataset, sample_motion)
from flame import FLAME
from modules.renderer import weak_perspective

SMALL = dict(size=32, train_videos=3, test_videos=2, frames=4, videos_per_identity=2, seed=3)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", **SMALL)


def _videos(root, split):
    folder = os.path.join(root, split)
    return sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)))


def test_layout_sidecars_and_disjoint_identities(small_dataset):
    root = small_dataset
    train, test = _videos(root, "train"), _videos(root, "test")
    assert len(train) == 3 and len(test) == 2
    assert all(re.fullmatch(r"id\d{5}#vid\d{2}#000", name) for name in train + test)
    train_ids, test_ids = {n.split("#")[0] for n in train}, {n.split("#")[0] for n in test}
    assert len(train_ids) == 2 and train_ids.isdisjoint(test_ids)
    for split, names in (("train", train), ("test", test)):
        for name in names:
            frames = sorted(os.listdir(os.path.join(root, split, name)))
            assert frames == [f"{t:07d}.png" for t in range(4)]
            image = imageio.imread(os.path.join(root, split, name, frames[0]))
            assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and image.std() > 10
            landmarks = np.load(os.path.join(root, split, name + ".landmarks.npy"), allow_pickle=False)
            assert landmarks.shape == (4, 74, 2) and landmarks.dtype == np.float32
            assert np.isfinite(landmarks).all() and (landmarks > -8).all() and (landmarks < 40).all()
            parsing = np.load(os.path.join(root, split, name + ".parsing.npy"), allow_pickle=False)
            assert parsing.shape == (4, 32, 32) and parsing.dtype == np.uint8
            assert parsing.max() < 9 and {0, 1} <= set(np.unique(parsing))
            with np.load(os.path.join(root, split, name + ".flame.npz"), allow_pickle=False) as codes:
                assert codes["shape"].shape == (4, 100) and codes["exp"].shape == (4, 50)
                assert codes["pose"].shape == (4, 6) and codes["cam"].shape == (4, 3)
                assert codes["eye_pose"].shape == (4, 6)
                assert all(codes[k].dtype == np.float32 for k in codes.files)
                assert np.allclose(codes["shape"], codes["shape"][0])           # one identity
    manifest = json.load(open(os.path.join(root, synthetic.MANIFEST)))
    assert manifest["params"]["size"] == 32 and manifest["stats"]["frames"] == 20


def test_frames_dataset_reads_it(small_dataset):
    from datasets.frames_dataset import list_videos, load_sidecars
    videos = list_videos(os.path.join(small_dataset, "train"))
    assert len(videos) == 3                                                 # sidecars are skipped
    side = load_sidecars(videos[0], load_landmarks=True, load_flame=True)
    assert side["landmarks"].shape == (4, 74, 2) and side["flame"]["pose"].shape == (4, 6)


def test_codes_reproduce_the_landmarks(small_dataset):
    flame = FLAME.open_head(100, 50)
    name = _videos(small_dataset, "test")[0]
    base = os.path.join(small_dataset, "test", name)
    codes = {k: torch.tensor(v) for k, v in np.load(base + ".flame.npz").items()}
    out = flame(shape=codes["shape"], exp=codes["exp"], pose=codes["pose"], eye_pose=codes["eye_pose"])
    pixels = (weak_perspective(out.landmarks, codes["cam"]) + 1) * 0.5 * (32 - 1)
    assert np.abs(pixels.numpy() - np.load(base + ".landmarks.npy")[:, :68]).max() < 1e-3


def test_codes_with_albedo_and_light_re_render_the_face_region(small_dataset):
    """Seed 003's I_r of the ground-truth codes (shape, exp, pose, cam, tex, light from the
    sidecar) reproduces every frame's face region up to the 8-bit rounding of the PNGs."""
    from flame.codes import FaceCodes
    from modules.shading import ShadedFace
    shaded = ShadedFace(FLAME.open_head(100, 50), 32)
    lights = []
    for split in ("train", "test"):
        for name in _videos(small_dataset, split):
            base = os.path.join(small_dataset, split, name)
            with np.load(base + ".flame.npz", allow_pickle=False) as arrays:
                assert arrays["tex"].shape == (4, 50) and arrays["light"].shape == (4, 27)
                assert np.allclose(arrays["tex"], arrays["tex"][0])              # one identity
                assert np.allclose(arrays["light"], arrays["light"][0])          # one scene
                codes = FaceCodes.from_numpy(dict(arrays))
                light = arrays["light"][0]
            frames = np.stack([imageio.imread(os.path.join(base, f"{t:07d}.png")) for t in range(4)])
            image = torch.tensor(frames).permute(0, 3, 1, 2).float() / 255
            with torch.no_grad():
                out = shaded(codes)
                relit = shaded(codes.replace(light=torch.tensor(lights[-1][None]).expand(4, -1))) \
                    if lights else None
            face = out["face_mask"].bool().expand(-1, 3, -1, -1)
            assert face.sum() > 3 * 4 * 150
            assert (out["image"].clamp(0, 1) - image)[face].abs().max() <= 0.5 / 255 + 1e-4
            if relit is not None:                       # another scene's light does not fit
                assert (relit["image"].clamp(0, 1) - image)[face].abs().mean() > 0.01
            lights.append(light)


def test_cached_dataset_is_reused_and_checked(small_dataset):
    stamp = os.path.getmtime(os.path.join(small_dataset, synthetic.MANIFEST))
    assert ensure_synthetic_dataset(small_dataset, **SMALL) == small_dataset
    assert os.path.getmtime(os.path.join(small_dataset, synthetic.MANIFEST)) == stamp
    with pytest.raises(ValueError, match="other parameters"):
        ensure_synthetic_dataset(small_dataset, **dict(SMALL, frames=5))
    with pytest.raises(TypeError, match="unknown"):
        ensure_synthetic_dataset(small_dataset, fps=3)


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_render_clip(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt("stopped by the user")
        return original(self, *args, **kwargs)

    original = TalkingHeadRenderer.render_clip
    monkeypatch.setattr(TalkingHeadRenderer, "render_clip", failing_render_clip)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_dataset(tmp_path / "data", **SMALL)
    assert os.listdir(tmp_path) == []                                        # no partial dataset


def _landmark_hits(renderer, identity, motion, scene):
    """Head coverage at the rounded landmark pixels (exact, and within one pixel) and whether
    the frame color there differs from the background."""
    frames, landmarks, head_mask, _ = renderer.render_clip(identity, motion, scene)
    size = renderer.size
    background = torch.tensor(scene["background"]).permute(2, 0, 1)[None]
    background = F.avg_pool2d(background, renderer.supersample)[0].permute(1, 2, 0).numpy()
    px = np.clip(np.round(landmarks).astype(int), 0, size - 1)
    t = np.arange(len(frames))[:, None]
    on_head = head_mask[t, px[..., 1], px[..., 0]]
    near = F.max_pool2d(torch.tensor(head_mask)[:, None], 3, 1, 1)[:, 0].numpy()
    near_head = near[t, px[..., 1], px[..., 0]]
    color = frames[t, px[..., 1], px[..., 0]] / 255.0
    differs = np.abs(color - background[px[..., 1], px[..., 0]]).max(-1) > 0.04
    return on_head, near_head, differs


def test_landmarks_land_on_the_rendered_face():
    renderer = TalkingHeadRenderer(size=64)
    rng = np.random.default_rng(11)
    identity, scene = renderer.sample_identity(rng), renderer.sample_scene(rng)
    motion = sample_motion(rng, 12, renderer.n_exp, identity["scale"])     # turns up to ~40 degrees
    on_head, near_head, differs = _landmark_hits(renderer, identity, motion, scene)
    assert on_head.shape == (12, 74)
    # turned heads put a few far-side points on the silhouette (or just behind it, as iBUG
    # annotations do): nearly all are on the face, all within a pixel of it
    assert (on_head > 0).mean() > 0.93 and differs.mean() > 0.93 and (near_head > 0).all()
    motion["pose"][:, :3] = 0                                               # facing the camera
    on_head, near_head, differs = _landmark_hits(renderer, identity, motion, scene)
    assert (on_head[:, 17:] > 0.5).all() and differs[:, 17:].all()   # inner 51, lids, pupils
    assert (near_head[:, :17] > 0).all() and differs.mean() > 0.97          # jaw line: its outline


def test_motion_ranges():
    rng = np.random.default_rng(0)
    motion = sample_motion(rng, 200, 50, 6.5)
    pitch, yaw, roll = np.degrees(motion["pose"][:, :3]).T
    assert np.abs(yaw).max() <= 45 and np.abs(pitch).max() <= 20 and np.abs(roll).max() <= 15
    assert motion["pose"][:, 3].min() >= 0 and motion["pose"][:, 3].max() <= 0.35
    assert np.abs(np.diff(motion["pose"], axis=0)).max() < 0.1                # smooth
    assert (motion["exp"][:, 5] >= 0).all()                       # blinks close, never widen


def test_command_line_prints_speed(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path / "cli"), "--size", "32", "--train_videos", "1",
                    "--test_videos", "1", "--frames", "3", "--seed", "1"])
    printed = capsys.readouterr().out
    assert "frames/s" in printed and os.path.isdir(tmp_path / "cli" / "train")


def test_grid_image(tmp_path):
    path = synthetic.make_grid(str(tmp_path / "grid.png"), size=32, identities=2, frames=3)
    image = imageio.imread(path)
    assert image.shape == (64, 96, 3)


@pytest.mark.slow
def test_generation_speed_at_64px(tmp_path):
    start = time.time()
    stats = synthetic.generate_dataset(str(tmp_path / "speed"), size=64, train_videos=4,
                                       test_videos=0, frames=32, progress=False)
    assert stats["frames"] == 128 and stats["fps"] >= 10, stats
    assert time.time() - start < 60


def test_concurrent_generation_of_one_dataset(tmp_path):
    """Two processes asking for the same dataset at once both succeed with one complete copy."""
    import subprocess
    import sys
    root = str(tmp_path / "shared")
    code = ("import sys; from datasets.synthetic import ensure_synthetic_dataset; "
            f"ensure_synthetic_dataset({root!r}, size=16, train_videos=1, test_videos=1, frames=3)")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=repo, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert os.path.isfile(os.path.join(root, "synthetic_manifest.json"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".synthetic_tmp")]
