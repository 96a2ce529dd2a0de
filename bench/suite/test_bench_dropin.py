"""Benchmark: a whole model, ``drmm_kernels.fuse(vgg11)`` against the unfused torchvision VGG11 (random weights,
small head, eval mode): inference under ``torch.no_grad()``, and guided-backprop attribution (Captum's
``GuidedBackprop`` on the unfused model vs ``with drmm_kernels.attribution("guided")`` on the fused one).

The precise, paired measurement on vgg11 and vgg16_bn (training step included) is ``bench/dropin.py``, whose model
and runners this module uses; here the two sides are timed apart, for comparisons between runs and commits.
"""

from __future__ import annotations

import pytest
import torch

import workloads  # noqa: F401  (puts bench/ on sys.path, for dropin and timing)
from dropin import TARGET_CLASS, build_model, captum_runner, fused_attribution_runner, fused_copy, inference_runner
from workloads import Impl, assert_close, assert_close_norm, synchronized

# (batch, pixels): timed, and with --benchmark-disable (every function once, checked) a small one.
TIMED, CHECK = (4, 64), (1, 32)
# The torchvision model as it is (for attribution: Captum on it), and drmm_kernels.fuse of a copy.
IMPLS = [Impl("unfused", "cpu"), Impl("fused", "cpu")]
IMPL_IDS = [i.id for i in IMPLS]
MODE = "guided"


@pytest.fixture(scope="module")
def vgg11():
    model = build_model("vgg11").eval()
    return {"unfused": model, "fused": fused_copy(model)}


@pytest.fixture(scope="module")
def size(request):
    return CHECK if request.config.getoption("benchmark_disable") else TIMED


def _x(size):
    batch, px = size
    return torch.randn(batch, 3, px, px, generator=torch.Generator().manual_seed(1))


def _group(what: str, size) -> str:
    """One table per workload: unfused and fused side by side."""
    batch, px = size
    return f"vgg11 {what} batch {batch} {px}x{px} cpu"


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_vgg11_inference(benchmark, vgg11, size, impl):
    x = _x(size)
    run = inference_runner(vgg11[impl.name], x)
    # First call outside the timing: the fused logits against the unfused model's.
    assert_close(run(), inference_runner(vgg11["unfused"], x)(), f"{impl.id} vgg11 logits")
    benchmark.group = _group("inference", size)
    benchmark(synchronized(run, "cpu"))


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_vgg11_attribution(benchmark, vgg11, size, impl):
    pytest.importorskip("captum")
    import warnings

    warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU activations")
    x = _x(size)
    captum = captum_runner(vgg11["unfused"], MODE, x, TARGET_CLASS)
    if impl.name == "unfused":
        run = captum
    else:
        run = fused_attribution_runner(vgg11["fused"], MODE, x, TARGET_CLASS, "autograd.grad")
    # First call outside the timing: the map against Captum's on the unfused model.
    assert_close_norm(run(), captum(), f"{impl.id} vgg11 {MODE} map", tol=1e-4)
    benchmark.group = _group(f"attribution {MODE}", size)
    benchmark(synchronized(run, "cpu"))
