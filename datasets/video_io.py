"""Reading videos frame by frame in every layout FOMM users have on disk, and writing them back.

Layouts: a folder of frame images, one image of frames stacked horizontally, or a video file
(.mp4/.gif/.mov/...). Frames are read on demand: two frames of a long video cost two decodes, never
the whole video. Every frame comes out as H x W x 3 uint8 RGB of the requested size; grayscale,
RGBA and off-size frames are converted with a logged note, or refused when asked to.
"""
import logging
import os
import re
import shutil
import subprocess
import tempfile

import imageio.v2 as imageio
import numpy as np
from PIL import Image

log = logging.getLogger("datasets")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".gif", ".mov", ".avi", ".mkv", ".webm", ".m4v")


class VideoReadError(ValueError):
    """A video exists but cannot be read as frames; the message names the file and a fix."""


def video_stem(path):
    """Name of a video without extension (a frame folder's own name)."""
    base = os.path.basename(os.path.normpath(path))
    root, ext = os.path.splitext(base)
    return root if ext.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS else base


def describe_error(error, limit=300):
    """One line for a message or log: the error's first line and, for ffmpeg's long reports, its
    last line (which says what went wrong); the banner in between is noise."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if len(lines) > 1:
        text += f" ... {lines[-1]}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def natural_key(name):
    """Sort key so that 'frame2.png' comes before 'frame10.png'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def temporary_path(final_path):
    """A fresh temporary file beside ``final_path`` with its extension (ffmpeg picks the container
    from it); rename it onto ``final_path`` once complete."""
    folder, name = os.path.split(os.path.abspath(final_path))
    stem, ext = os.path.splitext(name)
    os.makedirs(folder, exist_ok=True)
    handle, path = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=folder)
    os.close(handle)
    return path


def is_video_entry(path):
    if os.path.isdir(path):
        return True
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS


def to_rgb_uint8(frame, source, frame_size=None, on_mismatch="convert", _noted=set()):
    """Any decoded frame -> H x W x 3 uint8 RGB, resized to ``frame_size = (H, W)`` if given.

    ``on_mismatch='refuse'`` raises instead of converting. Notes are logged once per file.
    """
    frame = np.asarray(frame)
    notes = []
    if frame.dtype != np.uint8:
        if np.issubdtype(frame.dtype, np.floating) and frame.max() <= 1.0:
            frame = frame * 255.0
        frame = np.clip(frame, 0, 255).astype(np.uint8)
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.ndim != 3:
        raise VideoReadError(f"{source}: a frame has shape {frame.shape}; expected H x W (x C)")
    channels = frame.shape[2]
    if channels == 1:
        notes.append("grayscale converted to RGB")
        frame = np.repeat(frame, 3, axis=2)
    elif channels == 2:
        notes.append("grayscale+alpha converted to RGB")
        frame = _drop_alpha(np.repeat(frame[:, :, :1], 3, axis=2), frame[:, :, 1])
    elif channels == 4:
        notes.append("RGBA composited over white")
        frame = _drop_alpha(frame[:, :, :3], frame[:, :, 3])
    elif channels != 3:
        raise VideoReadError(f"{source}: frames have {channels} channels; expected 1, 3 or 4")
    if frame_size is not None and tuple(frame.shape[:2]) != tuple(frame_size):
        notes.append(f"resized from {frame.shape[1]}x{frame.shape[0]} to "
                     f"{frame_size[1]}x{frame_size[0]}")
        if on_mismatch != "refuse":
            frame = resize_frame(frame, frame_size)
    if notes:
        if on_mismatch == "refuse":
            raise VideoReadError(f"{source}: frames need conversion ({'; '.join(notes)}) and "
                                 "dataset_params.on_mismatch is 'refuse'; convert the file or set "
                                 "on_mismatch: convert")
        key = (str(source), tuple(notes))
        if key not in _noted:
            _noted.add(key)
            log.info("%s: %s", source, "; ".join(notes))
    return np.ascontiguousarray(frame)


def _drop_alpha(rgb, alpha):
    a = alpha.astype(np.float32)[:, :, None] / 255.0
    return (rgb.astype(np.float32) * a + 255.0 * (1.0 - a)).round().astype(np.uint8)


def resize_frame(frame, size):
    """Resize an H x W x 3 uint8 frame to ``size = (H, W)`` with area-aware resampling."""
    height, width = size
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BICUBIC))


class VideoReader:
    """Random access to the frames of one video, in any supported layout.

    ``len(reader)`` is the frame count; ``reader[i]`` decodes frame ``i`` only; iterating streams
    frames in order. ``fps`` is the video's frame rate or ``None`` when it has none.
    """

    def __init__(self, path, frame_size=None, on_mismatch="convert"):
        self.path = path
        self.frame_size = tuple(frame_size) if frame_size is not None else None
        self.on_mismatch = on_mismatch
        self.fps = None
        if not os.path.exists(path):
            raise FileNotFoundError(f"video not found: {path}")
        if os.path.isdir(path):
            self._kind = "folder"
            self._files = sorted((f for f in os.listdir(path)
                                  if f.lower().endswith(IMAGE_EXTENSIONS)), key=natural_key)
            if not self._files:
                raise VideoReadError(f"{path}: folder contains no frames ({', '.join(IMAGE_EXTENSIONS)})"
                                     "; remove it from the dataset or add its frames")
            self._length = len(self._files)
        elif path.lower().endswith(IMAGE_EXTENSIONS):
            self._kind = "stacked"
            self._stacked = self._read_image(path)
            height, width = self._stacked.shape[:2]
            frame_width = self.frame_size[1] if self.frame_size else height
            if width % frame_width:
                raise VideoReadError(f"{path}: image width {width} is not a multiple of the frame "
                                     f"width {frame_width}; a stacked-frames image holds frames "
                                     "side by side (set dataset_params.frame_shape to match)")
            self._frame_width = frame_width
            self._length = width // frame_width
        elif path.lower().endswith(VIDEO_EXTENSIONS):
            self._kind = "video"
            self._open_video()
        else:
            raise VideoReadError(f"{path}: unsupported file type; use a frame folder, one of "
                                 f"{IMAGE_EXTENSIONS} (stacked frames) or {VIDEO_EXTENSIONS}")

    def _read_image(self, path):
        try:
            return np.asarray(imageio.imread(path))
        except Exception as error:  # imageio raises many types for bad files
            raise VideoReadError(f"{path}: cannot read image ({error}); the file is corrupt or "
                                 "not an image") from None

    def _open_video(self):
        try:
            self._reader = imageio.get_reader(self.path)
            meta = self._reader.get_meta_data()
            self.fps = meta.get("fps")
            if self.path.lower().endswith(".gif"):
                self._length = self._reader.get_length()
                durations = meta.get("duration")
                if durations:
                    self.fps = 1000.0 / float(durations)
            else:
                self._length = self._reader.count_frames()
        except Exception as error:
            raise VideoReadError(f"{self.path}: cannot decode video ({describe_error(error)}). The file is corrupt or uses a codec ffmpeg cannot read;"
                                 " re-encode it, e.g. ffmpeg -i in.mov -c:v libx264 out.mp4") from None
        if not self._length or self._length == float("inf"):
            raise VideoReadError(f"{self.path}: video has no readable frames")

    def __len__(self):
        return self._length

    def _raw(self, index):
        if self._kind == "folder":
            return self._read_image(os.path.join(self.path, self._files[index]))
        if self._kind == "stacked":
            w = self._frame_width
            return self._stacked[:, index * w:(index + 1) * w]
        try:
            return self._reader.get_data(index)
        except Exception as error:
            raise VideoReadError(f"{self.path}: cannot decode frame {index} ({error})") from None

    def __getitem__(self, index):
        if not -self._length <= index < self._length:
            raise IndexError(f"{self.path}: frame {index} out of range (video has {self._length})")
        frame = self._raw(index % self._length)
        self.last_raw_size = np.asarray(frame).shape[:2]  # before resizing: for scaling landmarks
        return to_rgb_uint8(frame, self.path, self.frame_size, self.on_mismatch)

    def __iter__(self):
        if self._kind != "video":
            for i in range(self._length):
                yield self[i]
            return
        count = 0
        try:
            for frame in imageio.get_reader(self.path):
                if count >= self._length:
                    break
                count += 1
                self.last_raw_size = np.asarray(frame).shape[:2]  # as __getitem__ records it
                yield to_rgb_uint8(frame, self.path, self.frame_size, self.on_mismatch)
        except Exception as error:
            raise VideoReadError(f"{self.path}: decoding stopped at frame {count} ({error})") from None

    def close(self):
        if self._kind == "video":
            self._reader.close()


def read_image(path, frame_size=None):
    """One image file (a portrait) as H x W x 3 uint8 RGB, converted and resized as needed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        image = np.asarray(imageio.imread(path))
    except Exception as error:
        raise VideoReadError(f"{path}: cannot read image ({error})") from None
    return to_rgb_uint8(image, path, frame_size, "convert")


class VideoWriter:
    """Streams H x W x 3 uint8 frames to a video, atomically: frames go to a temporary file beside
    ``path`` that is renamed onto it by ``close()``; ``abort()`` (or an exception inside a ``with``
    block) removes it, so a half-written video never appears under the final name. mp4/mov/mkv are
    H.264 through imageio-ffmpeg; gif through imageio."""

    def __init__(self, path, fps, quality=8):
        self.path = path
        self.fps = float(fps)
        self.quality = quality
        self.temp = temporary_path(path)
        self._writer = None
        self.frames = 0

    def _open(self, frame):
        if self.path.lower().endswith(".gif"):
            self._writer = imageio.get_writer(self.temp, format="GIF", mode="I",
                                              duration=1000.0 / self.fps)
            self._send = self._writer.append_data
            return
        import imageio_ffmpeg
        height, width = frame.shape[:2]
        self._writer = imageio_ffmpeg.write_frames(
            self.temp, (width, height), fps=self.fps, codec="libx264", quality=self.quality,
            macro_block_size=1, ffmpeg_log_level="error")
        self._writer.send(None)  # start ffmpeg
        self._send = self._writer.send

    def write(self, frame):
        frame = np.ascontiguousarray(frame, dtype=np.uint8)
        if self._writer is None:
            self._open(frame)
        self._send(frame)
        self.frames += 1

    def close(self):
        if self._writer is None:
            self.abort()
            raise ValueError(f"no frames were written to {self.path}")
        self._writer.close()
        os.replace(self.temp, self.path)

    def abort(self):
        try:
            if self._writer is not None:
                self._writer.close()
        except Exception as error:  # ffmpeg may already be gone; the temp file goes either way
            log.debug("writer for %s did not close cleanly: %s", self.path, error)
        if os.path.exists(self.temp):
            os.remove(self.temp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _ffmpeg():
    import imageio_ffmpeg
    return imageio_ffmpeg.get_ffmpeg_exe()


def has_audio(path):
    """Whether a media file has an audio stream (ffmpeg's stream listing)."""
    if not os.path.isfile(path) or not path.lower().endswith(VIDEO_EXTENSIONS):
        return False
    result = subprocess.run([_ffmpeg(), "-hide_banner", "-i", path], capture_output=True, text=True)
    return "Audio:" in result.stderr


def copy_audio(video_path, audio_source, output_path):
    """Mux the audio of ``audio_source`` into ``video_path`` (video stream copied) -> ``output_path``.

    Returns True when audio was carried over, False when the source has none (or is None).
    """
    if audio_source is None or not has_audio(audio_source):
        if os.path.abspath(video_path) != os.path.abspath(output_path):
            shutil.move(video_path, output_path)
        return False
    tmp = temporary_path(output_path)
    command = [_ffmpeg(), "-y", "-loglevel", "error", "-i", video_path, "-i", audio_source,
               "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac", "-shortest", tmp]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        os.remove(tmp)
        raise RuntimeError(f"could not copy the audio of {audio_source}: {result.stderr.strip()}")
    os.replace(tmp, output_path)
    if os.path.abspath(video_path) != os.path.abspath(output_path):
        os.remove(video_path)
    return True
