"""run.py command line: help, config resolution errors, unregistered models, bad overrides."""
import contextlib
import io
import os
import subprocess
import sys
import types

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, cwd=REPO):
    """``python run.py ARGS`` in a new process (what a user runs)."""
    return subprocess.run([sys.executable, os.path.join(REPO, "run.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def run_main(*args, cwd=REPO):
    """``run.main(ARGS)`` in this process, from ``cwd``: the same exit code and messages as the
    command line without the ~3 s of a new interpreter importing torch."""
    import run
    out, err, previous = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = run.main(list(args))
            except SystemExit as exit_:
                code = exit_.code
    finally:
        os.chdir(previous)
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_help_documents_every_option():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("--config", "--mode", "--log_dir", "--checkpoint", "--device_ids", "--seed",
                   "--verbose", "--set", "train", "reconstruction", "animate", "--source_image",
                   "--driving_video", "--best_frame"):
        assert option in result.stdout, option


def test_list_models():
    result = run_main("--list_models")
    assert result.returncode == 0 and "fomm" in result.stdout.split()


def test_unregistered_model_fails_with_registered_list(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": "fomn"}))
    result = run_main("--config", str(path), "--mode", "train")
    assert result.returncode == 2
    assert "unknown model 'fomn'" in result.stderr and "fomm" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_name_and_bad_override(tmp_path):
    result = run_main("--config", "no-such-config.yaml", "--mode", "train")
    assert result.returncode == 2 and "not found" in result.stderr and "vox-fomm.yaml" in result.stderr
    result = run_main("--config", "vox-fomm.yaml", "--set", "train_params.batch_sise=3")
    assert result.returncode == 2 and "train_params.batch_size" in result.stderr


def test_config_name_resolves_from_another_directory(tmp_path):
    """A bare name is looked up in configs/ even when run from elsewhere; a bad type is reported."""
    result = run_main("--config", "vox-fomm", "--set", "train_params.num_epochs=many", cwd=tmp_path)
    assert result.returncode == 2
    assert "train_params.num_epochs" in result.stderr and "expects int" in result.stderr
