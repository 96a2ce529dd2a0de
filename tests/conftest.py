"""Test configuration. TRITON_INTERPRET must be set before anything imports a Triton kernel."""

import os
import subprocess

def _gpu_visible() -> bool:
    # Decide without importing torch.cuda state twice; nvidia-smi is absent on CPU machines.
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False

if not _gpu_visible():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI budget: a handful of examples per property, no deadline (first calls compile / interpret).
settings.register_profile("ci", max_examples=int(os.environ.get("DRMM_HYPOTHESIS_EXAMPLES", "12")),
                          deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run bench/device_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_backend():
    import drmm_kernels
    before = drmm_kernels.get_backend()
    yield
    drmm_kernels.backends._selection.name = before
