"""tools/fit_3dmm.py on a short synthetic video with a tiny random 'tdmm' checkpoint: sidecar
structure, frames without a face, smoothing, refinement, resuming and failures (not accuracy)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from datasets.video_io import VideoReader
from flame import FaceCodes
from modules.coords import pixels_to_normalized
from modules.face_kit import FLAME_PARAMS, TDMM_PARAMS, build_tdmm_encoder
from modules.one_euro import smooth_sequence
from modules.renderer import weak_perspective
from tools import fit_3dmm
from tools.fit_3dmm import (CODE_KEYS, Fitter, LandmarkSource, fit_folder, frames_to_images,
                            load_tdmm, sidecar_complete)

NO_FACE = [2, 3]                                         # frames whose landmarks we blank out
SMOOTHING = {"min_cutoff": 1.0, "beta": 0.5, "d_cutoff": 1.0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 'tdmm' checkpoint as train.py writes it, randomly initialized (head non-zero, so the
    codes change from frame to frame)."""
    torch.manual_seed(0)
    tdmm_params = {**TDMM_PARAMS, "imagenet_init": False}
    encoder = build_tdmm_encoder(tdmm_params, FLAME_PARAMS)
    torch.nn.init.normal_(encoder.head.weight, std=2e-3)
    path = str(tmp_path_factory.mktemp("tdmm") / "checkpoint_latest.pth")
    params = {"tdmm_params": {k: v for k, v in tdmm_params.items()
                              if k not in ("checkpoint", "freeze_bn_stats")},
              "flame_params": dict(FLAME_PARAMS)}
    torch.save({"model": "tdmm", "model_params": params, "epoch": 0,
                "state_dict": {f"encoder.{k}": v for k, v in encoder.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="module")
def fitted_models(checkpoint):
    return load_tdmm(checkpoint)


@pytest.fixture
def videos(tmp_path, synthetic_root):
    """One synthetic clip (frames + landmark sidecar, no FLAME sidecar); two frames without a face."""
    split = os.path.join(synthetic_root, "test")
    stem = sorted(n for n in os.listdir(split) if os.path.isdir(os.path.join(split, n)))[0]
    root = tmp_path / "videos"
    root.mkdir()
    shutil.copytree(os.path.join(split, stem), root / stem)
    landmarks = np.load(os.path.join(split, stem + ".landmarks.npy"))
    landmarks[NO_FACE] = np.nan
    np.save(root / f"{stem}.landmarks.npy", landmarks)
    return str(root), str(root / stem)


def run(videos_root, models, output=None, smoothing=SMOOTHING, refine_steps=0, **kwargs):
    encoder, face_model = models
    fitter = Fitter(encoder, face_model, refine_steps=refine_steps)
    source = LandmarkSource("auto", input_root=videos_root)
    return fit_folder(videos_root, fitter, source, output, smoothing=smoothing, progress=False,
                      **kwargs)


def load(path):
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def test_sidecar_structure_no_face_frames_and_smoothing(videos, fitted_models, tmp_path):
    root, video = videos
    assert run(root, fitted_models) == {video: "done"}
    smoothed = load(video + ".flame.npz")
    frames = len(VideoReader(video))
    sizes = {"shape": 100, "exp": 50, "pose": 6, "cam": 3}
    for key, size in sizes.items():
        assert smoothed[key].shape == (frames, size) and smoothed[key].dtype == np.float32
    expected_found = np.ones(frames, bool)
    expected_found[NO_FACE] = False
    assert np.array_equal(smoothed["found"], expected_found)
    info = json.loads(str(smoothed["info"]))
    assert info["landmarks"] == "sidecar" and info["frames"] == frames
    # frames without a face hold the codes of the last frame with one
    for key in CODE_KEYS:
        assert np.array_equal(smoothed[key][NO_FACE[0]], smoothed[key][NO_FACE[0] - 1])
        assert np.array_equal(smoothed[key][NO_FACE[1]], smoothed[key][NO_FACE[0] - 1])
    # unsmoothed: exactly the encoder's codes on the frames with a face
    raw_dir = str(tmp_path / "raw")
    assert run(root, fitted_models, output=raw_dir, smoothing=None) == {video: "done"}
    raw = load(os.path.join(raw_dir, os.path.basename(video) + ".flame.npz"))
    reader = VideoReader(video)
    with torch.no_grad():
        direct = fitted_models[0](frames_to_images([reader[i] for i in range(frames)])).codes
    found = expected_found
    for key in CODE_KEYS:
        np.testing.assert_allclose(raw[key][found], getattr(direct, key).numpy()[found], atol=1e-5)
        # the smoothed sidecar is the One-Euro filter of those codes, over the frames with a face
        fps = reader.fps or 25.0
        np.testing.assert_allclose(smoothed[key],
                                   smooth_sequence(raw[key], fps, valid=found, **SMOOTHING),
                                   atol=1e-5)
    assert np.abs(np.diff(smoothed["exp"][found], axis=0)).sum() < \
        np.abs(np.diff(raw["exp"][found], axis=0)).sum()


def test_refinement_brings_the_landmarks_closer(videos, fitted_models, tmp_path):
    root, video = videos
    landmarks = np.load(video + ".landmarks.npy")[:, :68]          # the iBUG points
    targets = pixels_to_normalized(landmarks, 32, 32)
    errors = {}
    for steps in (0, 30):
        out = str(tmp_path / f"steps{steps}")
        run(root, fitted_models, output=out, smoothing=None, refine_steps=steps)
        arrays = load(os.path.join(out, os.path.basename(video) + ".flame.npz"))
        codes = FaceCodes.from_numpy(arrays)
        projected = weak_perspective(fitted_models[1](codes).landmarks, codes.cam).detach().numpy()
        found = arrays["found"]
        errors[steps] = np.abs(projected[found] - targets[found]).sum(-1).mean()
    assert errors[30] < 0.5 * errors[0]


class RecordedDetector:
    """Stands in for a landmark network: hands out a known track batch by batch."""

    def __init__(self, track):
        self.track, self.calls = track, []

    def __call__(self, frames):
        start = sum(self.calls)
        self.calls.append(len(frames))
        return self.track[start:start + len(frames)]


def test_detected_landmarks_are_batched_with_the_frames(videos, fitted_models):
    root, video = videos
    track = np.load(video + ".landmarks.npy")
    os.remove(video + ".landmarks.npy")                          # no sidecar: detect
    detector = RecordedDetector(track)
    fitter = Fitter(*fitted_models)
    arrays, info = fit_3dmm.fit_video(video, fitter, LandmarkSource("auto", detector=detector),
                                      batch_size=4, smoothing=None)
    assert detector.calls == [4, len(track) - 4] and info["landmarks"] == "detected"
    assert np.array_equal(arrays["found"], np.isfinite(track).all(axis=(1, 2)))


def test_resume_skips_complete_sidecars_and_redoes_broken_ones(videos, fitted_models):
    root, video = videos
    target = video + ".flame.npz"
    assert run(root, fitted_models) == {video: "done"}
    stamp = os.stat(target).st_mtime_ns
    assert run(root, fitted_models) == {video: "skipped"}
    assert os.stat(target).st_mtime_ns == stamp
    with open(target, "r+b") as handle:                          # a half-written file
        handle.truncate(100)
    assert not sidecar_complete(target, len(VideoReader(video)))
    assert run(root, fitted_models) == {video: "done"}
    assert sidecar_complete(target, len(VideoReader(video)))
    assert run(root, fitted_models, overwrite=True) == {video: "done"}
    assert not [n for n in os.listdir(root) if ".tmp" in n]      # no temporaries left behind
    # a complete sidecar written by something else (no 'found') is kept
    frames = len(VideoReader(video))
    np.savez(target, **{k: np.zeros((frames, n), np.float32)
                        for k, n in (("shape", 3), ("exp", 2), ("pose", 6), ("cam", 3))})
    assert run(root, fitted_models) == {video: "skipped"}
    np.savez(target, **{k: np.zeros((frames - 1, 3), np.float32) for k in CODE_KEYS})
    assert run(root, fitted_models) == {video: "done"}          # one row short: redone


def test_command_line_exit_status(videos, checkpoint, tmp_path, caplog):
    root, video = videos
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 300)
    faceless = broken / "faceless"
    shutil.copytree(video, faceless)
    np.save(broken / "faceless.landmarks.npy", np.full((len(VideoReader(video)), 68, 2), np.nan,
                                                       np.float32))
    common = ["--checkpoint", checkpoint, "--no-progress", "--landmarks", "sidecar"]
    assert fit_3dmm.main(common + ["--input", str(broken)]) == 1   # every input failed
    assert not [n for n in os.listdir(broken) if n.endswith(".flame.npz")]
    assert "no face in any frame" in caplog.text
    shutil.copytree(video, broken / "good")
    shutil.copy(video + ".landmarks.npy", broken / "good.landmarks.npy")
    assert fit_3dmm.main(common + ["--input", str(broken)]) == 0   # one worked
    assert os.path.isfile(broken / "good.flame.npz")
    assert fit_3dmm.main(common + ["--input", str(tmp_path / "nowhere")]) == 2
    assert fit_3dmm.main(["--checkpoint", checkpoint, "--input", root, "--landmarks", "none",
                          "--refine-steps", "5"]) == 2


def test_a_checkpoint_of_another_model_is_refused(tmp_path, caplog, videos):
    path = str(tmp_path / "fomm.pth")
    torch.save({"model": "fomm", "model_params": {}, "state_dict": {}}, path)
    with pytest.raises(ValueError, match="holds a 'fomm' model"):
        load_tdmm(path)
    assert fit_3dmm.main(["--checkpoint", path, "--input", videos[0], "--no-progress"]) == 2
