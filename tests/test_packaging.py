"""Packaging metadata that the GPU machine's tools accept (it has no package registry to upgrade them)."""

from __future__ import annotations

import os
import subprocess
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bundled_setuptools_venv(path: str) -> str:
    """A venv made offline by ensurepip; on Python <= 3.11 it carries the old setuptools (65.x)."""
    venv.EnvBuilder(with_pip=True).create(path)
    py = os.path.join(path, "bin", "python")
    probe = subprocess.run(
        [py, "-c", "import setuptools; print(setuptools.__version__)"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip("this Python's ensurepip bundles no setuptools (3.12+): no old setuptools to test against")
    return py


def test_old_setuptools_accepts_pyproject(tmp_path):
    # setuptools < 77 rejects PEP 639 metadata such as `license = "MIT"`; the GPU machine builds with
    # what it has, so the project must validate under the oldest setuptools we meet.
    py = _bundled_setuptools_venv(str(tmp_path / "venv"))
    code = (
        "import sys, setuptools; from setuptools.config.pyprojecttoml import read_configuration; "
        "cfg = read_configuration(sys.argv[1]); print(setuptools.__version__, cfg['project']['name'])"
    )
    r = subprocess.run([py, "-c", code, os.path.join(ROOT, "pyproject.toml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    version, name = r.stdout.split()
    assert name == "drmm"
    assert int(version.split(".")[0]) >= 64, f"editable installs need setuptools >= 64, the venv has {version}"


def test_license_file_is_shipped():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        assert "MIT License" in f.readline()
