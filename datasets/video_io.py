"""Reading videos frame by frame in every layout FOMM users have on disk, and writing them back.

Layouts: a folder of frame images, one image of frames stacked horizontally, or a video file
(.mp4/.gif/.mov/...). Frames are read on demand: two frames of a long video cost two decodes, never
the whole video. Every frame comes out as H x W x 3 uint8 RGB of the requested size; grayscale,
RGBA and off-size frames are converted with a logged note, or refused when asked to.
"""
import errno
import logging
import os
import re
import shutil
import subprocess
import tempfile
from fractions import Fraction

import imageio.v2 as imageio
import numpy as np
from PIL import Image, ImageOps

from atomic_files import temporary_path, write_failure

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


def is_video_entry(path):
    if os.path.isdir(path):
        return True
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS


def to_rgb_uint8(frame, source, frame_size=None, on_mismatch="convert", conversions=(),
                 _noted=set()):
    """Any decoded frame -> H x W x 3 uint8 RGB, resized to ``frame_size = (H, W)`` if given.

    16-bit (and other wide unsigned) samples are scaled to 8 bits, float frames in [0, 1] to
    [0, 255]. ``conversions``: notes of what the reader already converted (e.g. CMYK to RGB).
    ``on_mismatch='refuse'`` raises instead of converting. Notes are logged once per file.
    """
    frame = np.asarray(frame)
    notes = list(conversions)
    if frame.dtype != np.uint8:
        frame = _to_8_bit(frame, notes)
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
        note_once(source, "; ".join(notes), _noted)
    return np.ascontiguousarray(frame)


def note_once(source, text, _noted=set(), level=logging.INFO):
    """Log ``source: text`` once per (file, text)."""
    key = (str(source), text)
    if key not in _noted:
        _noted.add(key)
        log.log(level, "%s: %s", source, text)


def _to_8_bit(frame, notes):
    """Samples of any numeric type -> uint8: unsigned integers scaled by their full range
    (a 16-bit 65535 is 255), floats in [0, 1] scaled by 255, anything else clipped to [0, 255]."""
    if np.issubdtype(frame.dtype, np.unsignedinteger):
        bits = 8 * frame.dtype.itemsize
        notes.append(f"{bits}-bit samples scaled to 8 bits")
        return np.round(frame.astype(np.float64) * (255.0 / (2 ** bits - 1))).astype(np.uint8)
    if np.issubdtype(frame.dtype, np.floating) and frame.size and np.nanmax(frame) <= 1.0:
        frame = frame * 255.0
    return np.clip(np.round(frame), 0, 255).astype(np.uint8)


# Pillow modes that are color spaces other than RGB: converted by Pillow itself (CMYK JPEGs
# written by Photoshop store inverted values, which Pillow's JPEG decoder already undoes).
_CONVERT_TO_RGB = {"CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB", "1": "L",
                   "PA": "RGBA"}


def load_image_file(path):
    """An image file as an array in its own layout (H x W or H x W x 2/3/4; uint8, or uint16 for
    16-bit images), with non-RGB color spaces (CMYK, YCbCr, LAB, HSV, palettes) converted to RGB
    and the EXIF orientation applied. Returns ``(array, notes)``: what was converted, in words."""
    notes = []
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            if image is not opened and opened.getexif().get(0x0112, 1) != 1:
                note_once(path, "rotated by its EXIF orientation")
            mode = image.mode
            if mode in _CONVERT_TO_RGB:
                image = image.convert(_CONVERT_TO_RGB[mode])
                notes.append(f"{mode} converted to {image.mode}")
            elif mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            array = np.asarray(image)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise VideoReadError(f"{path}: cannot read image ({describe_error(error)}); the file is "
                             "corrupt or not an image") from None
    if mode.startswith("I") and array.dtype != np.uint16:
        # 32-bit integer images ("I"): 16-bit PNG/TIFF data in practice
        array = np.clip(array, 0, 65535).astype(np.uint16)
    return array, notes


def _drop_alpha(rgb, alpha):
    a = alpha.astype(np.float32)[:, :, None] / 255.0
    return (rgb.astype(np.float32) * a + 255.0 * (1.0 - a)).round().astype(np.uint8)


def resize_frame(frame, size):
    """Resize an H x W x 3 uint8 frame to ``size = (H, W)`` with area-aware resampling."""
    height, width = size
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BICUBIC))


# Frame counts of opened video files, keyed by what identifies one version of a file (its real
# path, inode, size and modification time in ns), so a changed or replaced file is counted again.
# Counting decodes the whole video (no container header is trusted), which costs more than the two
# frames a training item reads; datasets reopen each video many times per epoch. One small entry
# per video file, per process (each data-loader worker keeps its own).
_FRAME_COUNTS = {}


def _file_version(path):
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns


def count_video_frames(path, reader):
    """Frame count of the video file ``path`` open in the imageio ``reader``, counted once per
    version of the file."""
    key = _file_version(path)
    if key not in _FRAME_COUNTS:
        _FRAME_COUNTS[key] = reader.count_frames()
    return _FRAME_COUNTS[key]


def declared_frame_count(meta):
    """Frames a video's header declares, ``round(duration * fps)``, or None when unknown."""
    duration, fps = meta.get("duration"), meta.get("fps")
    try:
        count = float(duration) * float(fps)
    except (TypeError, ValueError):
        return None
    return int(round(count)) if np.isfinite(count) and count > 0 else None


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
        self._conversions = []  # what reading the last image converted (CMYK, ...), for notes
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
        array, notes = load_image_file(path)
        self._conversions = notes
        return array

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
                self._length = count_video_frames(self.path, self._reader)
        except Exception as error:
            raise VideoReadError(f"{self.path}: cannot decode video ({describe_error(error)}). The file is corrupt or uses a codec ffmpeg cannot read;"
                                 " re-encode it, e.g. ffmpeg -i in.mov -c:v libx264 out.mp4") from None
        if not self._length or self._length == float("inf"):
            raise VideoReadError(f"{self.path}: video has no readable frames")
        if not self.path.lower().endswith(".gif"):
            self._check_declared_length(meta)

    def _check_declared_length(self, meta):
        """Warn (or refuse, with ``on_mismatch='refuse'``) when fewer frames decode than the
        container declares (its duration x fps): a truncated file, e.g. an interrupted download
        of an mp4 whose index sits at the front, otherwise reads as a shorter video."""
        declared = declared_frame_count(meta)
        # the header's duration has centisecond precision: allow a frame or 1 % of rounding
        if declared is None or declared - self._length <= max(1, round(0.01 * declared)):
            return
        message = (f"decoded {self._length} of the {declared} frames the container declares "
                   "(duration x fps); the file is probably truncated (an interrupted download or "
                   "copy): re-fetch or re-encode it")
        if self.on_mismatch == "refuse":
            raise VideoReadError(f"{self.path}: {message}, and dataset_params.on_mismatch is "
                                 "'refuse'")
        note_once(self.path, message, level=logging.WARNING)

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
        return to_rgb_uint8(frame, self.path, self.frame_size, self.on_mismatch, self._conversions)

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
    image, notes = load_image_file(path)
    return to_rgb_uint8(image, path, frame_size, "convert", notes)


# Containers the writer produces: H.264 through ffmpeg, or GIF through imageio.
WRITABLE_VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".m4v", ".avi", ".gif")


def check_output_path(path, inputs=()):
    """Refuse an output video path the writer cannot fill, or one that is one of ``inputs``
    (writing there would destroy the input). Returns ``path``."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in WRITABLE_VIDEO_EXTENSIONS:
        raise ValueError(f"output video {path!r} has {f'the extension {ext!r}' if ext else 'no extension'}"
                         f"; the writer picks the format from it: use one of "
                         f"{', '.join(WRITABLE_VIDEO_EXTENSIONS)}")
    if os.path.isdir(path):
        raise ValueError(f"output video {path!r} is a folder; give a file name such as "
                         f"{os.path.join(path, 'result.mp4')}")
    for source in inputs:
        if source is not None and isinstance(source, (str, os.PathLike)) and \
                os.path.exists(source) and os.path.exists(path) and os.path.samefile(source, path):
            raise ValueError(f"output video {path!r} is the input {os.fspath(source)!r}; writing "
                             "it would destroy the input: choose another output path")
    return path


class VideoWriter:
    """Streams H x W x 3 uint8 frames to a video, atomically: frames go to a temporary file beside
    ``path`` that is renamed onto it by ``close()`` only when the encoder succeeded and wrote a
    non-empty file; otherwise (an encoder error, a full disk, no frames) the temporary file is
    removed and :class:`atomic_files.OutputWriteError` names the reason. ``abort()`` (or an
    exception inside a ``with`` block) removes it too, so a half-written video never appears
    under the final name. mp4/mov/mkv/m4v/avi are H.264 through imageio-ffmpeg's ffmpeg binary;
    gif through imageio."""

    def __init__(self, path, fps, quality=8):
        self.path = check_output_path(path)
        self.fps = float(fps)
        self.quality = quality
        self.temp = temporary_path(path)
        self._writer = self._process = self._stderr = None
        self.frames = 0

    def _open(self, frame):
        if self.path.lower().endswith(".gif"):
            self._writer = imageio.get_writer(self.temp, format="GIF", mode="I",
                                              duration=1000.0 / self.fps)
            return
        height, width = frame.shape[:2]
        # libx264's 4:2:0 chroma needs even sizes; odd ones keep full chroma instead
        chroma = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
        crf = int((1 - self.quality / 10.0) * 51)  # imageio-ffmpeg's quality scale (8 -> 10)
        command = [_ffmpeg(), "-y", "-loglevel", "error", "-f", "rawvideo", "-vcodec", "rawvideo",
                   "-s", f"{width}x{height}", "-pix_fmt", "rgb24",
                   "-r", str(Fraction(self.fps).limit_denominator()), "-i", "-", "-an",
                   "-vcodec", "libx264", "-pix_fmt", chroma, "-crf", str(crf), self.temp]
        self._stderr = tempfile.TemporaryFile()  # a file, not a pipe: ffmpeg never blocks on it
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL, stderr=self._stderr)
        self._size = (height, width)

    def _encoder_message(self):
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace")
        return describe_error(text) if text.strip() else ""

    def _fail(self, error):
        message = self._encoder_message()
        self.abort()
        failure = write_failure(self.path, OSError(errno.ENOSPC, message)
                                if "No space left" in message else error, "video")
        raise type(failure)(f"{failure}{f' (ffmpeg: {message})' if message else ''}") from error

    def write(self, frame):
        frame = np.ascontiguousarray(frame, dtype=np.uint8)
        if self._writer is None and self._process is None:
            self._open(frame)
        try:
            if self._writer is not None:
                self._writer.append_data(frame)
            else:
                if tuple(frame.shape[:2]) != self._size:
                    raise ValueError(f"frame {self.frames} is {frame.shape[1]}x{frame.shape[0]} "
                                     f"but the video is {self._size[1]}x{self._size[0]}")
                self._process.stdin.write(frame.tobytes())
        except (KeyboardInterrupt, SystemExit):
            self.abort()
            raise
        except Exception as error:  # ffmpeg gone (disk full, bad path): its own words say why
            self._fail(error)
        self.frames += 1

    def close(self):
        """Finish the file and rename it onto ``path``; raises (and removes it) on any failure."""
        if not self.frames:
            self.abort()
            raise ValueError(f"no frames were written to {self.path}; nothing was saved")
        try:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            else:
                self._process.stdin.close()
                code = self._process.wait()
                if code != 0:
                    raise OSError(f"ffmpeg exited with status {code}")
            if os.path.getsize(self.temp) == 0:
                raise OSError("the encoder wrote an empty file")
            os.replace(self.temp, self.path)
        except (KeyboardInterrupt, SystemExit):
            self.abort()
            raise
        except Exception as error:
            self._fail(error)
        finally:
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None

    def abort(self):
        """Stop the encoder and remove the temporary file (never raises)."""
        try:
            if self._writer is not None:
                self._writer.close()
            if self._process is not None and self._process.poll() is None:
                self._process.kill()
                self._process.wait()
        except Exception as error:  # the encoder may already be gone; the temp file goes anyway
            log.debug("writer for %s did not close cleanly: %s", self.path, error)
        self._writer = None
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
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or os.path.getsize(tmp) == 0:
            raise OSError(f"ffmpeg could not copy the audio of {audio_source} "
                          f"({describe_error(result.stderr) if result.stderr.strip() else 'empty output'})")
        os.replace(tmp, output_path)
    except OSError as error:
        raise write_failure(output_path, error, "video") from error
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if os.path.abspath(video_path) != os.path.abspath(output_path):
        os.remove(video_path)
    return True
