"""Availability of the Triton backend; importable without triton."""

from __future__ import annotations

import os
from typing import Tuple

import torch


def is_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def status() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"triton is not importable ({exc})"
    if not (torch.cuda.is_available() or is_interpreting()):
        return False, "no CUDA device is visible (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    return True, "Triton kernels" + (" (interpreter)" if is_interpreting() else "")


def supports(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and is_interpreting())
