"""Face crops of real inputs and paste-back (datasets/face_crop.py, datasets/cropped_video.py):
geometry checked by hand computations, tracks on recorded detections, and the dlib detector on
synthetic portraits (tests/test_crop_animate.py runs the whole animate path)."""
import logging

import numpy as np
import pytest

from datasets.cropped_video import CroppedVideoReader, FaceCropper, NoFaceDetector, crop_sidecars
from datasets.face_crop import (crop_frame, crop_points, crop_track, feather_mask, limit_steps,
                                paste_back, place_square, select_face, square_crop)
from datasets.video_io import VideoReader
from modules.backends import Skipped


# --------------------------------------------------------------------------- geometry
def test_training_rule_and_padded_crops():
    box = np.array([10, 20, 60, 90])                       # 50 x 70 face box, centre (35, 55)
    assert square_crop(box, 240, 320, 1.5) == (0, 2, 105)  # fit: pushed inside the frame
    # not fit: same size and centre as the rule's, padded where it leaves the frame
    assert square_crop(box, 240, 320, 1.5, fit=False) == (0, 2, 105)
    assert square_crop(np.array([0, 0, 300, 200]), 240, 320, 2.0, fit=False) == (-150, -200, 600)
    # a crop larger than a side covers it (centred on the face if it can), never shrunk
    left, top, side = place_square(50, 100, 150, 200, 120, fit=False)
    assert side == 150 and left == -25 and top == 25
    assert place_square(50, 100, 150, 200, 120, fit=True) == (0, 40, 120)


def test_crop_frame_pads_with_edge_pixels_and_maps_points():
    frame = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    patch = crop_frame(frame, (-2, 3, 4), 4)                 # rows 3..6, columns -2..1
    assert np.array_equal(patch[:3, 2:], frame[3:6, 0:2])
    assert np.array_equal(patch[:3, 0], frame[3:6, 0]) and np.array_equal(patch[:3, 1], frame[3:6, 0])
    assert np.array_equal(patch[3], patch[2])                # row 6 repeats the last row
    # pixel (x=1, y=4) of the frame is pixel (3, 1) of that crop; at twice the size, the centre
    # of the 2 x 2 block that replaces it
    assert np.allclose(crop_points([[1, 4]], (-2, 3, 4), 4), [[3, 1]])
    assert np.allclose(crop_points([[1, 4]], (-2, 3, 4), 8), [[6.5, 2.5]])


def test_select_face_largest_or_numbered_from_the_left():
    boxes = np.array([[200, 10, 260, 70, 0.9], [10, 10, 90, 90, 0.5], [100, 0, 140, 40, 1.0]])
    assert np.array_equal(select_face(boxes), boxes[1])           # the largest
    assert np.array_equal(select_face(boxes, 1), boxes[2])        # second from the left
    with pytest.raises(ValueError, match=r"face_index 3 .*0: \(10, 10\)-\(90, 90\)"):
        select_face(boxes, 3)
    assert select_face(np.zeros((0, 5))) is None


def recorded_drift(frames=40, speed=2.0, jitter=10.0, missing=(0, 1, 15, 16, 17, 18), seed=0):
    """Detections of a 60-pixel face drifting right ``speed`` px a frame, each box side
    jittering by up to ``jitter`` px (as detectors do), none in the ``missing`` frames."""
    rng = np.random.default_rng(seed)
    centre = 60 + speed * np.arange(frames)
    detections = []
    for t in range(frames):
        noise = rng.uniform(-jitter, jitter, 4)
        box = [centre[t] - 30, 50, centre[t] + 30, 110, 1.0] + np.r_[noise, 0]
        detections.append(np.zeros((0, 5)) if t in missing else box[None])
    return detections, centre


def test_crop_track_is_smooth_follows_the_face_and_holds_without_one():
    detections, centre = recorded_drift()
    crops, found = crop_track(detections, 240, 320, fps=25, max_step=0.05)
    assert found.tolist() == [t not in (0, 1, 15, 16, 17, 18) for t in range(40)]
    centre_x = crops[:, 0] + crops[:, 2] / 2
    raw_x = np.array([(d[0, 0] + d[0, 2]) / 2 if len(d) else np.nan for d in detections])
    raw_side = np.array([max(d[0, 2] - d[0, 0], d[0, 3] - d[0, 1]) * 1.8 if len(d) else np.nan
                         for d in detections])
    bound = 0.05 * crops[:, 2].max() + 1                      # max_step of the side, + rounding
    assert np.abs(np.diff(centre_x)).max() <= bound
    assert np.abs(np.diff(crops[:, 2])).max() <= bound
    # the raw detections move more than that from frame to frame: the smoothing did the bounding
    assert np.nanmax(np.abs(np.diff(raw_x))) > 1.5 * 0.05 * 108
    assert np.nanmax(np.abs(np.diff(raw_side))) > 3 * bound
    # it follows the drift (lag under a tenth of the crop) where the face is seen
    seen = found & (np.arange(40) > 22)
    assert np.abs(centre_x - centre)[seen].max() < 0.1 * 108
    # frames without a face keep the last good crop (the first good one before any)
    assert (crops[15:19] == crops[14]).all() and (crops[0] == crops[2]).all()


def test_crop_track_without_any_face_and_limit_steps():
    crops, found = crop_track([np.zeros((0, 5))] * 3, 100, 100)
    assert crops is None and not found.any()
    stepped = limit_steps(np.array([[0.0], [1.0], [1.0], [0.5]]), 0.3)
    assert np.allclose(stepped[:, 0], [0, 0.3, 0.6, 0.5])


# --------------------------------------------------------------------------- paste back
def test_paste_back_changes_only_the_crop_and_blends_smoothly():
    rng = np.random.default_rng(1)
    original = rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)
    animated = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    crop = (40, -10, 48)                                      # leaves the picture right and top
    out = paste_back(original, animated, crop)
    assert out.shape == original.shape and out.dtype == np.uint8
    changed = np.any(out != original, axis=2)
    assert not changed[38:].any() and not changed[:, :40].any()
    mask = feather_mask(48)
    assert mask[24, 24] == 1 and mask[0].max() == 0 and mask[:, 0].max() == 0
    assert 0 < mask[24, 3] < mask[24, 6] < 1                  # a smooth ramp towards the border
    big = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(animated)
                     .resize((48, 48), 3))                    # bicubic, as paste_back resizes
    assert np.array_equal(out[14, 64], big[24, 24])           # full weight: the animated pixel
    ones = paste_back(original, animated, crop, np.ones((48, 48), np.float32))
    assert np.array_equal(ones[0:38, 40:70], big[10:48, 0:30])
    with pytest.raises(ValueError, match="mask has shape"):
        paste_back(original, animated, crop, np.ones((4, 4), np.float32))


# --------------------------------------------------------------------------- crop modes
class RecordedDetector:
    """Stands in for a ``faces`` backend (only where the test is about what happens around the
    detector, not about detection): returns the boxes it was given, in the frame's pixels."""
    name = "recorded"

    def __init__(self, boxes):
        self.boxes, self.calls = boxes, 0

    def __call__(self, frame):
        self.calls += 1
        return self.boxes(frame) if callable(self.boxes) else self.boxes


def test_auto_uses_frame_size_inputs_as_they_are_and_crops_others():
    frame = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    detector = RecordedDetector(np.array([[40.0, 50, 80, 90, 1]]))
    cropper = FaceCropper("auto", (32, 32), detector=detector)
    same = cropper.picture(frame)
    assert same.frame is same.original and same.crop is None and detector.calls == 0
    photo = np.random.default_rng(1).integers(0, 256, (400, 300, 3), dtype=np.uint8)
    picture = cropper.picture(photo)
    assert picture.crop == (24, 34, 72) and picture.frame.shape == (32, 32, 3)
    assert np.array_equal(picture.frame, crop_frame(photo, (24, 34, 72), 32))
    assert picture.paste(picture.frame).shape == photo.shape
    squashed = FaceCropper("none", (32, 32)).picture(photo)
    assert squashed.crop is None and squashed.paste(squashed.frame).shape == photo.shape
    with pytest.raises(ValueError, match="crop mode 'fase'"):
        FaceCropper("fase", (32, 32))


def test_missing_detector_says_how_to_get_one(monkeypatch, caplog):
    import datasets.cropped_video as cropped_video
    monkeypatch.setattr(cropped_video, "load_face_detector",
                        lambda *a, **k: Skipped("dlib-hog: package not installed (dlib)"))
    photo = np.full((60, 40, 3), 100, np.uint8)
    with pytest.raises(NoFaceDetector, match="pip install dlib-bin.*crop 'none'"):
        FaceCropper("face", (32, 32)).picture(photo)
    caplog.set_level(logging.WARNING, logger="datasets.face_crop")
    picture = FaceCropper("auto", (32, 32)).picture(photo)
    assert "pip install dlib-bin" in caplog.text and "--crop none" in caplog.text
    assert picture.crop == (-10, 0, 60) and picture.face is None    # whole picture, padded
    assert np.array_equal(picture.paste(np.zeros((32, 32, 3), np.uint8)), np.zeros_like(photo))


def test_no_face_in_a_picture(caplog):
    photo = np.full((60, 40, 3), 100, np.uint8)
    nothing = RecordedDetector(np.zeros((0, 5)))
    with pytest.raises(ValueError, match="no face found.*crop 'auto'"):
        FaceCropper("face", (32, 32), detector=nothing).picture(photo)
    caplog.set_level(logging.WARNING, logger="datasets.face_crop")
    assert FaceCropper("auto", (32, 32), detector=nothing).picture(photo).crop == (-10, 0, 60)
    assert "no face found" in caplog.text


# --------------------------------------------------------------------------- real detector
@pytest.fixture
def detector(face_detector):
    return face_detector


@pytest.fixture
def portrait(synthetic_portrait):
    return synthetic_portrait


@pytest.fixture(scope="module")
def drifting(tmp_path_factory, drifting_frames):
    """A 176 x 144 clip (12 frames, 10 fps) whose face drifts left to right, written as mp4, and
    the same with frame 5 replaced by an empty frame (no face)."""
    from conftest import write_video
    frames, landmarks = drifting_frames
    folder = tmp_path_factory.mktemp("drifting")
    gap = frames.copy()
    gap[5] = gap[5].mean(axis=(0, 1), keepdims=True).astype(np.uint8)
    return (write_video(str(folder / "drift.mp4"), frames), landmarks,
            write_video(str(folder / "gap"), gap))


def test_portrait_face_is_found_and_cropped_at_the_training_scale(detector, portrait):
    photo, landmarks = portrait
    assert photo.shape == (256, 208, 3)
    picture = FaceCropper("auto", (64, 64), detector=detector).picture(photo)
    left, top, side = picture.crop
    x1, y1, x2, y2 = picture.face[:4]
    assert side == round(1.8 * max(x2 - x1, y2 - y1))
    face = landmarks[:68]
    span = (face.max(0) - face.min(0)).max()
    assert 1.6 < side / span < 2.6                       # about twice the landmarks' extent
    centre = np.array([left, top]) + side / 2
    assert np.abs(centre - (face.max(0) + face.min(0)) / 2).max() < 0.12 * side
    assert side < 0.6 * min(photo.shape[:2])             # a face crop, not the whole photo
    two = np.concatenate([photo, photo[:, ::-1]], axis=1)    # two faces, the right one mirrored
    right = FaceCropper("auto", (64, 64), face_index=1, detector=detector).picture(two)
    assert right.crop[0] > photo.shape[1] - side and right.crop[0] + side <= two.shape[1] + 1
    with pytest.raises(ValueError, match="face_index 2"):
        FaceCropper("auto", (64, 64), face_index=2, detector=detector).picture(two)


def test_drifting_face_gives_a_smooth_track_that_holds_the_face_in_place(detector, drifting):
    path, landmarks, gap_path = drifting
    reader = FaceCropper("auto", (64, 64), detector=detector).video(path)
    assert isinstance(reader, CroppedVideoReader) and len(reader) == 12 and reader.fps == 10
    crops = reader.crops
    centre = crops[:, :2] + crops[:, 2:] / 2
    assert np.abs(np.diff(centre, axis=0)).max() <= 0.05 * crops[:, 2].max() + 1
    assert np.abs(np.diff(crops[:, 2])).max() <= 0.05 * crops[:, 2].max() + 1
    # in the raw frames the face moves ~44 px; in the crops it stays nearly in place
    raw_centre = landmarks[:, :68].mean(axis=1)
    in_crop = reader.crop_landmarks(landmarks[:, :68]).mean(axis=1)
    raw_travel = np.ptp(raw_centre[:, 0])
    assert raw_travel > 35
    assert np.ptp(in_crop[:, 0]) * crops[:, 2].mean() / 64 < 0.35 * raw_travel
    frames = list(reader)
    assert len(frames) == 12 and all(f.shape == (64, 64, 3) for f in frames)
    assert np.array_equal(frames[7], reader[7])
    reader.close()
    # a frame without a face: no crash, it keeps the crop before it
    gap = FaceCropper("auto", (64, 64), detector=detector).video(gap_path)
    assert (gap.crops[5] == gap.crops[4]).all() and len(list(gap)) == 12
    assert "face found in 11 of 12 frames" in gap.note
    gap.close()


def test_frame_size_videos_are_not_cropped_and_sidecars_follow_crops(detector, drifting,
                                                                      tmp_path):
    from conftest import moving_square_frames, write_video
    path = drifting[0]
    reader = FaceCropper("auto", (64, 64), detector=detector).video(path)
    sidecars = crop_sidecars(reader, {"landmarks": drifting[1]})
    assert np.allclose(sidecars["landmarks"], reader.crop_landmarks(drifting[1]), atol=1e-4)
    with pytest.raises(ValueError, match="fitted to the uncropped frames"):
        crop_sidecars(reader, {"flame": {"exp": np.zeros((12, 2))}})
    reader.close()
    counting = RecordedDetector(np.zeros((0, 5)))
    cropped_already = write_video(str(tmp_path / "tube"), moving_square_frames(3, 64))
    same = FaceCropper("auto", (64, 64), detector=counting).video(cropped_already)
    assert isinstance(same, VideoReader) and counting.calls == 0
    assert crop_sidecars(same, {"flame": 1}) == {"flame": 1}
    uncropped = FaceCropper("none", (64, 64)).video(path)
    assert isinstance(uncropped, VideoReader) and uncropped[0].shape == (64, 64, 3)
    wide_model = FaceCropper("auto", (144, 176), detector=counting)
    assert wide_model.picture(np.zeros((144, 176, 3), np.uint8)).crop is None
    with pytest.raises(ValueError, match="face crops are square.*176x144"):
        wide_model.picture(np.zeros((100, 100, 3), np.uint8))
