"""Faults of the environment, kept fixed: a kill in the middle of a write, a full disk, two
processes training in one run folder, read-only folders, and the permissions of outputs.

A full disk and a read-only folder are real: a small tmpfs (read-only, or a few MiB) mounted
in a private mount namespace of a child process (``unshare -rm``, no privileges needed where
user namespaces are enabled). Where they are not, a full disk falls back to the file-size limit
(``RLIMIT_FSIZE``: writes fail with EFBIG, as they fail with ENOSPC on a full disk), and a
read-only folder to ``chmod`` (not for root, whom permissions do not stop: skipped then).
"""
import functools
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from atomic_files import default_file_mode, write_atomically
from checkpoint import load_checkpoint, save_checkpoint_atomic
from conftest import moving_square_frames, write_video
from datasets.video_io import VideoWriter
from logger import RunLock, RunLockedError
from test_reliability import STEP_SETS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


@functools.lru_cache(maxsize=None)
def can_mount_tmpfs():
    """Whether a child can mount a tmpfs in a private mount namespace here."""
    probe = ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_on_small_disk(mount, command, size="256k", read_only=False, timeout=300):
    """Run ``command`` with a tmpfs of ``size`` (or a read-only one) mounted at ``mount``;
    without namespaces, a full disk is the file-size limit ``size`` and a read-only folder a
    ``chmod 0555`` (returns None for root, whom that does not stop)."""
    os.makedirs(mount, exist_ok=True)
    if can_mount_tmpfs():
        options = "ro,size=64k" if read_only else f"size={size}"
        wrapped = ["unshare", "-rm", "sh", "-c",
                   f'mount -t tmpfs -o {options} tmpfs "$0" && exec "$@"', mount, *command]
        return subprocess.run(wrapped, capture_output=True, text=True, timeout=timeout, env=ENV)
    if read_only:
        if os.geteuid() == 0:
            return None
        os.chmod(mount, 0o555)
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                  env=ENV)
        finally:
            os.chmod(mount, 0o755)
    limit = int(size.rstrip("k")) * 1024 if size.endswith("k") else int(size.rstrip("m")) * 2 ** 20

    def limit_file_size():  # over the limit a write fails with EFBIG instead of killing
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV,
                          preexec_fn=limit_file_size)


def python(script):
    return [sys.executable, "-c", textwrap.dedent(script)]


def temporaries(folder):
    return [name for name in os.listdir(folder) if ".tmp" in name]


# --------------------------------------------------------------------------- a full disk
def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path):
    mount = str(tmp_path / "disk")
    result = run_on_small_disk(mount, python(f"""
        import os, torch
        from checkpoint import load_checkpoint, save_checkpoint_atomic
        path = os.path.join({mount!r}, "checkpoint_latest.pth")
        save_checkpoint_atomic({{"step": 1, "w": torch.zeros(1000)}}, path)
        try:
            save_checkpoint_atomic({{"step": 2, "w": torch.zeros(200_000)}}, path)
        except OSError as error:
            print("ERROR", error)
        print("KEPT", load_checkpoint(path)["step"], sorted(os.listdir({mount!r})))
    """), size="256k")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ERROR could not write checkpoint" in result.stdout
    assert "the disk is full" in result.stdout or "write failed" in result.stdout
    assert "enforce fail" not in result.stdout
    assert "the previous" in result.stdout and "is intact" in result.stdout
    assert "KEPT 1 ['checkpoint_latest.pth']" in result.stdout  # no temporary file left


@pytest.mark.slow  # a run.py training in a child (fast: the checkpoint test above)
def test_training_on_a_full_disk_exits_with_a_message_and_its_last_checkpoint(tiny_dataset,
                                                                               tmp_path):
    """run.py: the second checkpoint of a run does not fit; exit status 1, a message saying the
    disk is full and that the previous checkpoint is intact, which still loads."""
    mount = str(tmp_path / "disk")
    sets = [f"dataset_params.root_dir={tiny_dataset}", *STEP_SETS, "train_params.max_steps=3",
            "train_params.checkpoint_every_steps=1"]
    command = [sys.executable, os.path.join(REPO, "run.py"), "--config", "tiny-fomm",
               "--device_ids", "cpu", "--log_dir", mount, "--run_name", "full",
               *sum((["--set", s] for s in sets), [])]
    result = run_on_small_disk(mount, command + ["--set", "train_params.num_workers=0"], size="7m",
                               timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "could not write checkpoint" in result.stderr and "is intact" in result.stderr
    assert "Traceback" not in result.stderr and "enforce fail" not in result.stderr


def test_disk_full_while_writing_a_video_is_an_error_and_leaves_no_file(tmp_path):
    mount = str(tmp_path / "disk")
    result = run_on_small_disk(mount, python(f"""
        import os, numpy as np
        from datasets.video_io import VideoWriter
        frames = np.random.RandomState(0).randint(0, 255, (40, 64, 64, 3)).astype(np.uint8)
        path = os.path.join({mount!r}, "result.mp4")
        try:
            with VideoWriter(path, 25) as writer:
                for frame in frames:
                    writer.write(frame)
            print("WROTE", os.path.getsize(path))
        except OSError as error:
            print("ERROR", error)
        print("LEFT", sorted(os.listdir({mount!r})))
    """), size="64k")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ERROR could not write video" in result.stdout and "WROTE" not in result.stdout
    assert "disk is full" in result.stdout or "ffmpeg" in result.stdout
    assert "LEFT []" in result.stdout  # neither a partial video nor its temporary file


def test_failed_sidecar_write_keeps_the_previous_file(tmp_path):
    mount = str(tmp_path / "disk")
    result = run_on_small_disk(mount, python(f"""
        import os, numpy as np
        from atomic_files import write_atomically
        path = os.path.join({mount!r}, "clip.landmarks.npy")
        write_atomically(path, lambda handle: np.save(handle, np.zeros((2, 68, 2))))
        try:
            write_atomically(path, lambda handle: np.save(handle, np.zeros((9000, 68, 2))),
                             what="sidecar")
        except OSError as error:
            print("ERROR", error)
        print("KEPT", np.load(path).shape, sorted(os.listdir({mount!r})))
    """), size="256k")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ERROR could not write sidecar" in result.stdout and "is intact" in result.stdout
    assert "KEPT (2, 68, 2) ['clip.landmarks.npy']" in result.stdout


# --------------------------------------------------------------------------- read-only folders
@pytest.mark.slow  # a run.py training in a child (fast: the test below, without run.py)
def test_read_only_log_dir_is_a_message_not_a_traceback(tiny_dataset, tmp_path):
    mount = str(tmp_path / "readonly")
    sets = [f"dataset_params.root_dir={tiny_dataset}", *STEP_SETS, "train_params.max_steps=1"]
    command = [sys.executable, os.path.join(REPO, "run.py"), "--config", "tiny-fomm",
               "--device_ids", "cpu", "--log_dir", mount, "--run_name", "run",
               *sum((["--set", s] for s in sets), [])]
    result = run_on_small_disk(mount, command, read_only=True)
    if result is None:
        pytest.skip("no mount namespace and running as root: permissions cannot stop a write")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "cannot write the run folder" in result.stderr and "--log_dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_read_only_folders_give_messages_naming_them(tmp_path):
    """The run folder (its lock and its logger), a checkpoint and a video in a read-only folder:
    each an OSError whose message names the place and the reason (run.py prints it)."""
    mount = str(tmp_path / "readonly")
    result = run_on_small_disk(mount, python(f"""
        import os, torch
        from checkpoint import save_checkpoint_atomic
        from datasets.video_io import VideoWriter
        from logger import Logger, RunLock
        run = os.path.join({mount!r}, "run")
        attempts = {{"lock": lambda: RunLock(run).acquire(), "logger": lambda: Logger(run),
                    "checkpoint": lambda: save_checkpoint_atomic({{}}, os.path.join({mount!r}, "c.pth")),
                    "video": lambda: VideoWriter(os.path.join({mount!r}, "out.mp4"), 25)}}
        for name, attempt in attempts.items():
            try:
                attempt()
                print(name, "WROTE")
            except OSError as error:
                print(name, "ERROR", error)
    """), read_only=True)
    if result is None:
        pytest.skip("no mount namespace and running as root: permissions cannot stop a write")
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert set(lines) == {"lock", "logger", "checkpoint", "video"}, result.stderr[-2000:]
    for name, text in lines.items():
        assert text.startswith("ERROR"), (name, text)
        assert "read-only" in text or "permission denied" in text, (name, text)
    assert "cannot write the run folder" in lines["lock"] and "--log_dir" in lines["logger"]
    assert "could not write checkpoint" in lines["checkpoint"] and "out.mp4" in lines["video"]


# --------------------------------------------------------------------------- kills mid-write
def _kill_when_a_temporary_appears(process, folder, timeout=120):
    """SIGKILL ``process`` while a temporary file of its write exists in ``folder``."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if temporaries(folder):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.005)
    process.kill()
    process.wait()
    return False


def test_killed_checkpoint_write_leaves_the_previous_one_and_the_lock_cleans_up(tmp_path):
    run_dir = str(tmp_path / "run")
    path = os.path.join(run_dir, "checkpoint_latest.pth")
    process = subprocess.Popen(python(f"""
        import torch
        from checkpoint import save_checkpoint_atomic
        save_checkpoint_atomic({{"version": 0, "w": torch.zeros(10)}}, {path!r})
        version = 1
        while True:
            save_checkpoint_atomic({{"version": version, "w": torch.randn(5_000_000)}}, {path!r})
            version += 1
    """), env=ENV)
    while not os.path.isfile(path) and process.poll() is None:
        time.sleep(0.01)
    assert _kill_when_a_temporary_appears(process, run_dir)
    left = temporaries(run_dir)
    assert left  # the kill came mid-write
    state = load_checkpoint(path)  # the previous checkpoint, complete
    assert state["w"].numel() == (10 if state["version"] == 0 else 5_000_000)
    with RunLock(run_dir):  # the next run in this folder removes what the killed one left
        assert temporaries(run_dir) == []


def test_killed_video_write_leaves_no_video(tmp_path):
    out = str(tmp_path / "out")
    target = os.path.join(out, "result.mp4")
    process = subprocess.Popen(python(f"""
        import numpy as np, time
        from datasets.video_io import VideoWriter
        writer = VideoWriter({target!r}, 25)
        frame = np.zeros((64, 64, 3), np.uint8)
        while True:
            writer.write(frame)
            time.sleep(0.01)
    """), env=ENV)
    os.makedirs(out, exist_ok=True)
    assert _kill_when_a_temporary_appears(process, out)
    assert not os.path.exists(target)


# --------------------------------------------------------------------------- concurrent runs
def test_a_locked_run_folder_refuses_a_second_training_naming_the_holder(tiny_dataset, tmp_path,
                                                                         capsys):
    """While another process trains in a run folder (here: holds its lock), a second training
    there exits with status 1 and a message naming the holder, writing nothing; once the holder
    is gone (even killed) the folder is free again: a lock is never stale."""
    from run import main
    run_dir = str(tmp_path / "run")
    holder = subprocess.Popen(python(f"""
        import time
        from logger import RunLock
        lock = RunLock({run_dir!r}).acquire()
        print("HELD", flush=True)
        time.sleep(300)
    """), env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        with pytest.raises(RunLockedError) as error:
            RunLock(run_dir).acquire()
        message = str(error.value)
        assert run_dir in message and f"pid {holder.pid}" in message and "--run_name" in message
        sets = sum((["--set", s] for s in [f"dataset_params.root_dir={tiny_dataset}", *STEP_SETS,
                                           "train_params.max_steps=1"]), [])
        code = main(["--config", "tiny-fomm", "--device_ids", "cpu", "--log_dir", str(tmp_path),
                     "--run_name", "run", *sets])
        err = capsys.readouterr().err
        assert code == 1 and "is in use by another training process" in err
        assert f"pid {holder.pid}" in err
        assert sorted(os.listdir(run_dir)) == [".lock"]  # nothing written beside the holder
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run_dir):
        assert json.loads(open(os.path.join(run_dir, ".lock")).read())["pid"] == os.getpid()


def test_train_locks_its_folder_and_is_reentrant(tiny_dataset, tmp_path):
    """The training API locks too (re-entrant inside one process: run.py and train() both take
    the lock); another process cannot enter meanwhile, and can once it is released."""
    from test_training import run, tiny_config
    run_dir = str(tmp_path / "run")
    probe = subprocess.Popen(python(f"""
        import sys
        from logger import RunLock, RunLockedError
        for _ in sys.stdin:
            try:
                RunLock({run_dir!r}).acquire().release()
                print("FREE", flush=True)
            except RunLockedError:
                print("LOCKED", flush=True)
    """), env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask():
        probe.stdin.write("?\n")
        probe.stdin.flush()
        return probe.stdout.readline().strip()
    try:
        with RunLock(run_dir):
            run(tiny_config(tiny_dataset, "train_params.max_steps=1"), run_dir)
            assert ask() == "LOCKED"  # train() released only its own, inner hold
        assert ask() == "FREE"
    finally:
        probe.kill()
        probe.wait()


# --------------------------------------------------------------------------- permissions
def test_outputs_get_the_umask_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        assert default_file_mode() == 0o644
        checkpoint = str(tmp_path / "checkpoint_latest.pth")
        save_checkpoint_atomic({"w": torch.zeros(2)}, checkpoint)
        sidecar = str(tmp_path / "clip.landmarks.npy")
        write_atomically(sidecar, lambda handle: np.save(handle, np.zeros((1, 68, 2))))
        video = str(tmp_path / "clip.mp4")
        with VideoWriter(video, 10) as writer:
            for frame in moving_square_frames(3, 32):
                writer.write(frame)
        for path in (checkpoint, sidecar, video):
            assert os.stat(path).st_mode & 0o777 == 0o644, path
    finally:
        os.umask(old)


def test_result_video_may_not_be_an_input_nor_lack_an_extension(tmp_path, capsys):
    """--result_video equal to --driving_video, or without an extension: exit status 1 before
    anything is written; the input stays as it was."""
    from run import main
    driving = write_video(str(tmp_path / "drive.mp4"), moving_square_frames(4, 32))
    source = str(tmp_path / "face.png")
    import imageio.v2 as imageio
    imageio.imwrite(source, moving_square_frames(1, 32)[0])
    before = open(driving, "rb").read()
    base = ["--config", "tiny-fomm", "--mode", "animate", "--device_ids", "cpu",
            "--checkpoint", str(tmp_path / "run" / "checkpoint_latest.pth"),
            "--source_image", source, "--driving_video", driving]
    assert main(base + ["--result_video", driving]) == 1
    assert "is the input" in capsys.readouterr().err and open(driving, "rb").read() == before
    assert main(base + ["--result_video", str(tmp_path / "result")]) == 1
    assert "no extension" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["drive.mp4", "face.png"]
    with pytest.raises(ValueError, match="no frames were written"):
        VideoWriter(str(tmp_path / "empty.mp4"), 25).close()
    assert sorted(os.listdir(tmp_path)) == ["drive.mp4", "face.png"]
