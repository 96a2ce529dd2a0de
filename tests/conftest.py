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
settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("DRMM_HYPOTHESIS_EXAMPLES", "12")),
    deadline=None,
    derandomize=True,
    print_blob=True,
)
settings.load_profile("ci")


def pytest_configure(config):
    # Backend markers: `pytest -m triton` runs every Triton test (interpreter and GPU ones), `-m cuda` every test
    # of the CUDA backend (all need a GPU), `-m cpu_backend` those of the C++ CPU kernels.
    for name, what in (
        ("triton", "a test of the Triton backend (skipped when it is unavailable)"),
        ("cuda", "a test of the CUDA backend (needs a GPU)"),
        (
            "cpu_backend",
            "a test of the C++ CPU backend (skipped when the extension is not built, outside DRMM_REQUIRE_EXTENSION=1)",
        ),
    ):
        config.addinivalue_line("markers", f"{name}: {what}")


def pytest_collection_modifyitems(config, items):
    from drmm_kernels import available_backends

    status = available_backends()
    required = os.environ.get("DRMM_REQUIRE_EXTENSION") == "1"
    skips = {
        "gpu": None
        if torch.cuda.is_available()
        else "needs a CUDA device (run bench/device_check.sh on a GPU machine)",
        "triton": None if status["triton"] else f"triton backend unavailable: {status['triton'].reason}",
        "cpu_backend": None if status["cpu"] or required else f"cpu backend unavailable: {status['cpu'].reason}",
    }
    for item in items:
        for keyword, reason in skips.items():
            if reason and item.get_closest_marker(keyword):
                item.add_marker(pytest.mark.skip(reason=reason))
                break


@pytest.fixture(autouse=True)
def _restore_backend():
    import drmm_kernels

    before = drmm_kernels.get_backend()
    yield
    drmm_kernels.dispatch._selection.name = before
