"""Real photos and videos as model inputs: found, face-cropped as the training data was, and the
animated crop pasted back (docs/crop_and_paste.md).

``crop`` modes, the same for animation, reconstruction and evaluation:

* ``auto`` (default): an input whose size differs from the model's frame size (any non-square
  picture, or a square one of another size) is a real photo or video: it is cropped around the
  face. Inputs of exactly the frame size are taken as already cropped (dataset frames,
  ``tools/crop_video.py`` tubes) and used as they are. When no detector loads or no face is
  found, the whole picture is used, padded to a square (aspect kept), with a warning that says
  why and how to fix it.
* ``face``: crop every input around its face; no detector or no face is an error.
* ``none``: no crop: every input is resized to the frame size (squashed if not square), as before.
"""
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from datasets.face_crop import (CROP_SCALE, DETECT_MIN_WIDTH, crop_frame, crop_points,
                                crop_track, describe_boxes, detect_scaled, feather_mask,
                                paste_back, place_square, select_face, square_crop)
from datasets.video_io import VideoReader, read_image, resize_frame, to_rgb_uint8

log = logging.getLogger("datasets.face_crop")

CROP_MODES = ("auto", "face", "none")
DETECTORS = ("sfd", "dlib-hog")   # S3FD when its weights are there, else dlib's HOG (offline)
DETECTOR_HINT = ("pip install dlib-bin (dlib's HOG face detector, CPU, offline), or put "
                 "face-alignment's S3FD weights in the torch hub cache")


class NoFaceDetector(RuntimeError):
    """``crop='face'`` was asked for but no face detector backend loads."""


def load_face_detector(names=DETECTORS, device=None):
    """The first ``faces`` backend of ``names`` that loads, else a ``Skipped`` with the reasons."""
    from modules.backends import first_available
    return first_available("faces", names, device=device)


def _whole_square(height, width):
    """The square around the whole picture, padded on its short side (aspect kept)."""
    return place_square(width / 2.0, height / 2.0, max(height, width), height, width, fit=False)


@dataclass
class CroppedPicture:
    """A source picture: ``original`` (H x W x 3 uint8, full resolution) and ``frame`` (the
    model's input). ``crop`` is ``(left, top, side)`` in the original, or ``None`` when the whole
    picture was resized (squashed); ``face`` is the face box the crop is around (``None``: the
    crop is the whole picture, padded)."""
    original: np.ndarray
    frame: np.ndarray
    crop: tuple = None
    face: np.ndarray = None
    note: str = ""
    _mask: np.ndarray = field(default=None, repr=False)

    @property
    def size(self):
        """(height, width) of the original."""
        return self.original.shape[:2]

    def paste(self, animated):
        """An animated frame (model size, uint8) put back into the original: same size as the
        original, pixels away from the face unchanged."""
        if self.crop is None:
            return resize_frame(animated, self.size)
        if self._mask is None:   # whole-picture crops replace everything inside the picture
            side = self.crop[2]
            self._mask = feather_mask(side) if self.face is not None \
                else np.ones((side, side), np.float32)
        return paste_back(self.original, animated, self.crop, self._mask)


class FaceCropper:
    """Crops inputs for a model of ``frame_size`` (H, W) by ``mode`` (see the module's doc).

    ``face_index``: which face of a picture with several (numbered from the left; default the
    largest). ``detector``: a ``faces`` backend (default: the first of :data:`DETECTORS` that
    loads, looked for when first needed). ``fps`` smoothing of video crop tracks uses each
    video's own frame rate (``default_fps`` when it has none).
    """

    def __init__(self, mode, frame_size, face_index=None, detector=None, scale=CROP_SCALE,
                 default_fps=25.0):
        if mode not in CROP_MODES:
            raise ValueError(f"crop mode {mode!r} is unknown; use one of {', '.join(CROP_MODES)}")
        self.mode, self.frame_size = mode, tuple(int(v) for v in frame_size[:2])
        self.face_index, self.scale, self.default_fps = face_index, scale, default_fps
        self._detector, self._detector_reason = detector, None

    def wants(self, shape):
        """Whether an input of ``shape`` (H, W, ...) is cropped."""
        wanted = self.mode == "face" or (self.mode == "auto"
                                         and tuple(shape[:2]) != self.frame_size)
        if wanted and self.frame_size[0] != self.frame_size[1]:
            raise ValueError(f"face crops are square but the model's frame size is "
                             f"{self.frame_size[1]}x{self.frame_size[0]}; use crop 'none'")
        return wanted

    @property
    def detector(self):
        """The face detector, or ``None`` (mode 'auto') when none loads."""
        if self._detector is None and self._detector_reason is None:
            found = load_face_detector()
            if found:
                self._detector = found
            else:
                self._detector_reason = found.reason
                if self.mode == "face":
                    raise NoFaceDetector(f"crop 'face' needs a face detector and none loads "
                                         f"({found.reason}). Install one: {DETECTOR_HINT}; or use "
                                         f"crop 'none' to resize the whole input")
                log.warning("no face detector loads (%s), so inputs are not cropped around the "
                            "face but used whole, padded to a square. Install one: %s; or pass "
                            "--crop none to keep this without the warning", found.reason,
                            DETECTOR_HINT)
        return self._detector

    def _detect(self, frame):
        return detect_scaled(self.detector, frame, min_width=DETECT_MIN_WIDTH)

    def _no_face(self, what, reason):
        if self.mode == "face":
            raise ValueError(f"{what}: {reason}, so it cannot be cropped around a face; use "
                             "crop 'auto' (whole picture, padded) or 'none' (resized)")
        log.warning("%s: %s; using the whole picture, padded to a square", what, reason)

    # ---------------------------------------------------------------- pictures
    def picture(self, image, name="source image"):
        """A :class:`CroppedPicture` of an image path or H x W x C array (any size; gray/RGBA
        converted)."""
        if isinstance(image, (str, os.PathLike)):
            name, original = os.fspath(image), read_image(os.fspath(image))
        else:
            original = to_rgb_uint8(image, name)
        height, width = original.shape[:2]
        size = f"{width}x{height}"
        if not self.wants(original.shape):
            frame = resize_frame(original, self.frame_size) \
                if original.shape[:2] != self.frame_size else original
            note = "used as it is" if frame is original else "resized whole (crop none)"
            return CroppedPicture(original, frame, note=f"{name} ({size}): {note}")
        face, reason = None, "no face detector"
        if self.detector is not None:
            boxes = self._detect(original)
            face = select_face(boxes, self.face_index)
            reason = "no face found"
            if len(boxes) > 1:
                log.info("%s: %d faces, numbered from the left: %s", name, len(boxes),
                         describe_boxes(boxes))
        if face is None:
            self._no_face(f"{name} ({size})", reason)
            crop = _whole_square(height, width)
            note = f"{name} ({size}): whole picture padded to {crop[2]} px ({reason})"
        else:
            crop = square_crop(face, height, width, self.scale, fit=False)
            note = (f"{name} ({size}): face ({face[0]:.0f}, {face[1]:.0f})-({face[2]:.0f}, "
                    f"{face[3]:.0f}), crop left {crop[0]} top {crop[1]} side {crop[2]} px")
        log.info("crop: %s", note)
        return CroppedPicture(original, crop_frame(original, crop, self.frame_size[0]), crop,
                              face, note)

    # ---------------------------------------------------------------- videos
    def video(self, path, on_mismatch="convert"):
        """A reader of the video's frames at the model's size: a :class:`CroppedVideoReader`
        when the video is cropped, else a plain :class:`VideoReader` (resized when needed)."""
        if self.mode == "none":
            return VideoReader(path, self.frame_size, on_mismatch)
        raw = VideoReader(path)
        try:
            shape = raw[0].shape
            if not self.wants(shape):
                raw.close()
                return VideoReader(path, self.frame_size, on_mismatch)
            crops, note = self.track(raw, path, shape)
        except BaseException:
            raw.close()
            raise
        log.info("crop: %s", note)
        return CroppedVideoReader(raw, crops, self.frame_size[0], note)

    def track(self, raw, path, shape):
        """``(T x 3 crops, note)`` for a raw video: the smoothed face track, or the whole frame."""
        height, width = shape[:2]
        count = len(raw)
        size = f"{width}x{height}, {count} frames"
        detections = [self._detect(frame) for frame in raw] if self.detector is not None else None
        crops, found = (None, np.zeros(count, bool)) if detections is None else \
            crop_track(detections, height, width, raw.fps or self.default_fps, self.scale)
        if crops is None:
            reason = "no face detector" if detections is None else "no face found in any frame"
            self._no_face(f"{path} ({size})", reason)
            crops = np.array([_whole_square(height, width)] * count)
            return crops, f"{path} ({size}): whole frames padded to {crops[0][2]} px ({reason})"
        sides = crops[:, 2]
        return crops, (f"{path} ({size}): face crop track, face found in {int(found.sum())} of "
                       f"{count} frames (the others keep the last crop), crop side "
                       f"{sides.min()}-{sides.max()} px")


class CroppedVideoReader:
    """The frames of a raw video, each cut by its crop of a track and resized to ``size``.

    Reads like :class:`datasets.video_io.VideoReader` (``len``, indexing, iteration, ``fps``,
    ``close``). ``crops`` is ``T x 3`` ``(left, top, side)`` in the raw frames' pixels.
    """

    def __init__(self, raw, crops, size, note=""):
        if len(crops) != len(raw):
            raise ValueError(f"{raw.path}: {len(crops)} crops for {len(raw)} frames")
        self.raw, self.crops, self.size, self.note = raw, np.asarray(crops), int(size), note
        self.path, self.fps = raw.path, raw.fps
        self.last_raw_size = (self.size, self.size)   # landmarks are mapped by crop_landmarks

    def __len__(self):
        return len(self.raw)

    def __getitem__(self, index):
        index = range(len(self))[index]
        return crop_frame(self.raw[index], self.crops[index], self.size)

    def __iter__(self):
        for index, frame in enumerate(self.raw):
            yield crop_frame(frame, self.crops[index], self.size)

    def crop_landmarks(self, points):
        """``T x K x 2`` pixel landmarks of the raw frames -> pixel landmarks of the crops."""
        points = np.asarray(points, np.float64)
        if len(points) != len(self):
            raise ValueError(f"{self.path}: {len(points)} landmark rows for {len(self)} frames")
        return np.stack([crop_points(p, c, self.size) for p, c in zip(points, self.crops)])

    def close(self):
        self.raw.close()


def crop_sidecars(reader, sidecars):
    """A video's sidecars for the frames ``reader`` gives: as they are for a plain reader; for a
    :class:`CroppedVideoReader`, landmarks mapped into the crops. 3DMM code sidecars were fitted
    to the uncropped frames (their camera would not match the crops): an error."""
    if not isinstance(reader, CroppedVideoReader) or not sidecars:
        return sidecars
    if sidecars.get("flame") is not None:
        raise ValueError(f"{reader.path}: its 3DMM code sidecar was fitted to the uncropped "
                         "frames, which are cropped here; cut the dataset into face crops first "
                         "(tools/crop_video.py) and fit the codes again (tools/fit_3dmm.py), or "
                         "use --crop none")
    out = dict(sidecars)
    if out.get("landmarks") is not None:
        out["landmarks"] = reader.crop_landmarks(out["landmarks"]).astype(np.float32)
    return out
