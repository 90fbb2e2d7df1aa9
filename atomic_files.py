"""Writing output files so that a reader never sees half of one.

Every output of the framework (checkpoints, videos, sidecars, state files) is written to a
temporary file beside its final path and renamed onto it once complete: a kill, a full disk or a
failed encoder leaves the previous file (or no file) under the final name, never a partial one.
Temporary files get the permissions an ordinary ``open()`` would give (``0666`` less the umask),
not the ``0600`` of :func:`tempfile.mkstemp`, so outputs stay readable by the group as usual.

This module is a leaf: it imports nothing else of the project.
"""
import errno
import os
import shutil
import tempfile

TEMP_MARK = ".tmp"       # every temporary name holds this, for remove_stale_temporaries
_FULL = (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))


class OutputWriteError(OSError):
    """An output could not be written; the message names the file, the reason and what survived."""


def default_file_mode():
    """The mode ``open(path, 'w')`` gives a new file: ``0o666`` less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def temporary_path(final_path):
    """A fresh empty file beside ``final_path``, with its extension (ffmpeg picks the container
    from it) and the default permissions; rename it onto ``final_path`` once complete."""
    folder, name = os.path.split(os.path.abspath(final_path))
    stem, ext = os.path.splitext(name)
    try:
        os.makedirs(folder, exist_ok=True)
        handle, path = tempfile.mkstemp(prefix=f".{stem}.", suffix=f"{TEMP_MARK}{ext}", dir=folder)
    except OSError as error:  # a read-only or full folder: say so, naming the final path
        raise write_failure(final_path, error) from error
    os.fchmod(handle, default_file_mode())
    os.close(handle)
    return path


def is_disk_full(error):
    """Whether an error says the disk (or the file size limit, or a quota) is exhausted."""
    return (isinstance(error, OSError) and error.errno in _FULL) or "No space left" in str(error)


def is_torch_write_failure(error):
    """torch's zip writer reports a failed write as '[enforce fail at inline_container.cc] ...
    file write failed' or '... unexpected pos', without the system's reason."""
    return isinstance(error, RuntimeError) and "inline_container" in str(error)


def free_space_note(folder):
    try:
        return f"{shutil.disk_usage(folder).free / 2 ** 20:.1f} MiB free there"
    except OSError:
        return "free space unknown"


def failure_reason(error, folder):
    """Why writing into ``folder`` failed, in words: a full disk, a permission, a read-only file
    system, or the error's own first line."""
    if is_disk_full(error):
        return f"the disk is full or a file size limit was reached ({free_space_note(folder)})"
    if is_torch_write_failure(error):
        return f"the write failed, most likely because the disk is full ({free_space_note(folder)})"
    if isinstance(error, PermissionError):
        return f"permission denied: {folder} is not writable by this user"
    if isinstance(error, OSError) and error.errno == errno.EROFS:
        return f"{folder} is on a read-only file system"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def write_failure(path, error, what="file"):
    """An :class:`OutputWriteError` for a failed write of ``path``: why (disk full, permission,
    read-only file system, ...), and whether a previous version of ``path`` survived."""
    reason = failure_reason(error, os.path.dirname(os.path.abspath(path)))
    kept = f"the previous {path} is intact" if os.path.exists(path) else f"no {what} was left at {path}"
    failure = OutputWriteError(f"could not write {what} {path}: {reason}; {kept}")
    failure.errno = getattr(error, "errno", None)
    return failure


def write_atomically(path, write, what="file"):
    """Call ``write(binary file)`` on a temporary file beside ``path``, fsync it, then rename it
    onto ``path``. On any failure the temporary file is removed and an :class:`OutputWriteError`
    says why and that the previous ``path`` (if any) is intact."""
    temp = None
    try:
        temp = temporary_path(path)
        with open(temp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:
        raise write_failure(path, error, what) from error
    finally:
        if temp is not None and os.path.exists(temp):
            os.remove(temp)


def remove_stale_temporaries(directory, prefix=""):
    """Delete temporary files a killed process left in ``directory`` (those named ``.<prefix>...``
    by :func:`temporary_path`). Call it only while no other process writes there (a run lock)."""
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in os.listdir(directory):
        if name.startswith(f".{prefix}") and TEMP_MARK in name:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                os.remove(path)
                removed.append(name)
    return removed
