"""The repository installs as a package: `pip install -e .` in a fresh virtual environment."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration  # a new venv and a pip install: seconds


def test_a_fresh_venv_installs_the_repository_editable_and_imports_it_from_another_directory(tmp_path):
    """`pip install -e .` in a new virtual environment, then the front door and the package import from a
    directory that is not the repository, resolved to the repository's files. Offline: the build backend
    (setuptools) and the dependencies come from this interpreter's site-packages on PYTHONPATH."""
    venv = tmp_path / "venv"
    # without its own pip (ensurepip takes seconds): the venv runs this interpreter's pip, on PYTHONPATH below
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    site = {"PATH": "/usr/bin:/bin", "PYTHONPATH": sysconfig.get_paths()["purelib"], "HF_HUB_OFFLINE": "1"}
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                              "--disable-pip-version-check", "-e", str(REPO)], capture_output=True, text=True, env=site)
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "import trainers, losses, train; from training import checkpoints; print(trainers.__file__, checkpoints.__file__)"
    proc = subprocess.run([python, "-c", code], cwd=elsewhere, capture_output=True, text=True, env=site)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(REPO / "trainers.py"), str(REPO / "training" / "checkpoints.py")]
