"""Input discovery for the preprocessing tools (frame reading and writing: datasets/video_io.py).

A video is a file (``.mp4``, ``.mov``, ``.gif``, ...) or a folder of images (its frames, in natural
order).
"""
import logging
import os

from tqdm import tqdm

from atomic_files import remove_stale_temporaries, write_atomically  # noqa: F401 (the tools' API)
from datasets.video_io import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, describe_error, natural_key


def image_files(folder):
    names = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)]
    return [os.path.join(folder, n) for n in sorted(names, key=natural_key)]


def is_frame_folder(path):
    return os.path.isdir(path) and bool(image_files(path))


def find_inputs(root, frame_folders=True):
    """Videos (files) and, optionally, frame folders under ``root`` (or ``root`` itself)."""
    if os.path.isfile(root) or (frame_folders and is_frame_folder(root)):
        return [root]
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs.sort(key=natural_key)
        if frame_folders and directory != root and is_frame_folder(directory):
            found.append(directory)
            subdirs.clear()  # a frame folder's own subfolders are not separate videos
            continue
        found += [os.path.join(directory, f) for f in sorted(files, key=natural_key)
                  if f.lower().endswith(VIDEO_EXTENSIONS)]
    return found


def strip_video_extension(name):
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in VIDEO_EXTENSIONS else name


def relative_stem(path, root):
    """Input name without its video extension, relative to ``root`` when ``root`` is a folder of
    inputs (just the input's own name when ``root`` is the input itself)."""
    path, root = os.path.normpath(path), os.path.normpath(root)
    if path == root:
        return strip_video_extension(os.path.basename(path))
    return strip_video_extension(os.path.relpath(path, root))


def sidecar_path(path, input_root, output_root, suffix):
    """Where the sidecar ``<stem><suffix>`` of video or frame folder ``path`` goes: beside it, or
    under ``output_root`` keeping its layout relative to ``input_root``."""
    if output_root is None:
        path = os.path.abspath(path)
        return os.path.join(os.path.dirname(path), relative_stem(path, path) + suffix)
    return os.path.join(output_root, relative_stem(path, input_root) + suffix)


def for_each_video(input_path, target_of, is_done, process, log=logging.getLogger("tools"),
                   progress=True):
    """The resumable loop of the sidecar tools: for each input under ``input_path``, with
    ``target = target_of(path)``, skip it when ``is_done(path, target)``, else
    ``process(path, target)`` (which writes the target). A failing input is logged and the others
    go on. Returns ``{input: status}``: 'done', 'skipped' or 'error: ...'."""
    summary = {}
    for path in tqdm(find_inputs(input_path), desc="videos", unit="video", disable=not progress):
        target = target_of(path)
        try:
            if is_done(path, target):
                summary[path] = "skipped"
                continue
            process(path, target)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as error:  # corrupt file, unreadable codec, no face, bad sidecar, ...
            summary[path] = f"error: {describe_error(error)}"
            log.warning("skipped %s: %s", path, summary[path][len("error: "):])
            continue
        summary[path] = "done"
    return summary


def log_summary(log, summary):
    """One line of counts; returns the number of failed inputs."""
    failed = sum(1 for status in summary.values() if status.startswith("error"))
    log.info("%d input(s): %d written, %d already done, %d failed", len(summary),
             sum(1 for s in summary.values() if s == "done"),
             sum(1 for s in summary.values() if s == "skipped"), failed)
    return failed


def exit_status(log, summary, input_path):
    """The tool's exit code after :func:`log_summary`: 1 when any input failed or none was found
    (a script or a pipeline must not take a failed run for a finished one), else 0."""
    failed = log_summary(log, summary)
    if not summary:
        log.error("no videos or frame folders found under %s", input_path)
        return 1
    if failed:
        log.error("%d of %d input(s) failed (see the warnings above); exit status 1", failed,
                  len(summary))
        return 1
    return 0
