"""pytest-benchmark suite of the fused ops (``pytest bench/suite``; ``make bench``; docs/benchmarks.md).

Not part of the test run (``testpaths = tests``); ``make test`` runs it once with ``--benchmark-disable``, which
calls every benchmarked function once, so broken benchmarks fail CI.
"""

from __future__ import annotations

import pytest
import torch

import drmm_kernels as dk
from workloads import COMPILE_MODE, IMPL_IDS, LAYER_IDS

# With --benchmark-disable nothing is timed: every function runs once and checks its result. That check needs
# neither the timing batch nor every compiled graph (a cold torch.compile costs 5-20 s of CPU per graph here,
# 20 graphs in all), so by default it runs a small batch and checks the compiled baseline on one pooled and one
# unpooled layer (both branches of the eager compositions), which keeps make test short on a loaded 2-core machine.
TIMED_BATCH, CHECK_BATCH = 256, 16
CHECK_COMPILED_LAYERS = "L3,L5"


def pytest_addoption(parser):
    group = parser.getgroup("drmm benchmarks")
    group.addoption(
        "--drmm-batch",
        type=int,
        default=None,
        help=f"batch size (default {TIMED_BATCH}, as bench/cpu_ops.py; {CHECK_BATCH} with --benchmark-disable)",
    )
    group.addoption(
        "--drmm-compiled-layers",
        default=None,
        help=f"layers on which to run the torch.compile baseline, comma-separated, or 'all' (default "
        f"all; {CHECK_COMPILED_LAYERS} with --benchmark-disable)",
    )
    group.addoption(
        "--drmm-threads",
        type=int,
        default=2,
        help="torch CPU threads (default 2, as bench/cpu_ops.py; 0 keeps torch's default)",
    )


def pytest_configure(config):
    threads = config.getoption("--drmm-threads")
    if threads > 0:
        torch.set_num_threads(threads)


def _checking(config) -> bool:
    return bool(config.getoption("benchmark_disable"))


def _batch(config) -> int:
    chosen = config.getoption("--drmm-batch")
    if chosen is not None:
        return chosen
    return CHECK_BATCH if _checking(config) else TIMED_BATCH


def _compiled_layers(config) -> list:
    chosen = config.getoption("--drmm-compiled-layers")
    if chosen is None:
        chosen = CHECK_COMPILED_LAYERS if _checking(config) else "all"
    if chosen == "all":
        return list(LAYER_IDS)
    names = [s.strip() for s in chosen.split(",") if s.strip()]
    unknown = [n for n in names if n not in LAYER_IDS]
    if unknown:
        raise pytest.UsageError(
            f"--drmm-compiled-layers: unknown layer {', '.join(unknown)} (layers: {', '.join(LAYER_IDS)})"
        )
    return names


def pytest_collection_modifyitems(config, items):
    keep = _compiled_layers(config)
    why = pytest.mark.skip(
        reason=f"compiled baseline run on {','.join(keep) or 'no layer'} only "
        f"(--drmm-compiled-layers; a cold torch.compile costs 5-20 s per graph)"
    )
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        impl, layer = params.get("impl"), params.get("layer")
        if impl is not None and impl.name == "compiled" and layer.name.split(".", 1)[1] not in keep:
            item.add_marker(why)


@pytest.fixture(scope="session")
def batch(request) -> int:
    return _batch(request.config)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Recorded in the JSON, so two saved runs can be told apart by more than the date."""
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["drmm_batch"] = _batch(config)
    machine_info["drmm_implementations"] = IMPL_IDS
    machine_info["drmm_backends"] = {n: s.reason for n, s in dk.available_backends().items() if s.available}
    machine_info["compiled_baseline"] = f"torch.compile(mode={COMPILE_MODE!r}, dynamic=False)"
    machine_info["compiled_layers"] = _compiled_layers(config)
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
