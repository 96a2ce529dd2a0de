"""The one timing harness of ``bench/``: how every benchmark here turns calls into numbers.

- :func:`alternated`: CPU wall clock of several callables measured in the same rounds, the order reversed every
  other round (ABBA for two), so that a change of machine load, and the cache and allocator state one call leaves
  the next, hit all alike; minor page faults counted per call, outside the timed span. ``bench/cpu_ops.py``
  (:func:`paired`, the CPU tables of docs/benchmarks.md) and ``bench/attribution.py`` time with it.
- :func:`summary` and :func:`pair_ratios`: medians and quartiles of those times, and of the per-round ratios of
  two of them (the paired speedup: load drift cancels in each ratio).
- :func:`gpu_quantiles_us`: GPU time of one callable by ``triton.testing.do_bench`` (CUDA events, L2 flushed
  between runs; median, p20, p80), for ``bench/kernels.py`` and so the device check's bench stage.
- :func:`synchronized`: the callable the pytest-benchmark suite (``bench/suite``, whose runner pytest-benchmark
  stays) times, waiting for its GPU kernels.

Imported as a top-level module (``import timing``): the scripts run from ``bench/``, which Python puts first on
``sys.path``; a script that can also be loaded by file path adds its own folder first.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def alternated(
    fns: Dict[str, Callable[[], object]], warmup: int, repeats: int
) -> Tuple[Dict[str, List[float]], Dict[str, float]]:
    """Times every callable once per round for ``repeats`` rounds after ``warmup`` untimed rounds.

    Even rounds call them in the order given, odd rounds in reverse (for two: ABBA): the second call of a round
    inherits the first one's cache and allocator state, which would otherwise bias every round the same way.
    Returns ``({name: [ms per round]}, {name: minor page faults per timed call})``; the faults are read outside the
    timed span.
    """
    order = list(fns.items())
    for _ in range(warmup):
        for _, fn in order:
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    faults = dict.fromkeys(fns, 0)
    for i in range(repeats):
        for name, fn in order if i % 2 == 0 else order[::-1]:
            f0 = _minor_faults()
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
            faults[name] += _minor_faults() - f0
    return times, {name: n / repeats if repeats else 0.0 for name, n in faults.items()}


def summary(times_ms: Sequence[float]) -> Dict[str, float]:
    """Median, quartiles (the ``len // 4``-th smallest and largest) and minimum of some times in ms."""
    times = sorted(times_ms)
    q = len(times) // 4
    return {"median_ms": statistics.median(times), "q1_ms": times[q], "q3_ms": times[-1 - q], "min_ms": times[0]}


def pair_ratios(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """Median and quartiles of the per-round ratios ``a_i / b_i`` (the paired speedup of b over a)."""
    ratio = summary([x / y for x, y in zip(a, b)])
    return {"median": ratio["median_ms"], "q1": ratio["q1_ms"], "q3": ratio["q3_ms"]}


def paired(
    eager: Callable[[], object], fused: Callable[[], object], warmup: int, repeats: int
) -> Tuple[Dict[str, float], Dict[str, float], Dict[str, float]]:
    """Times both with :func:`alternated` (ABBA).

    Returns the two time summaries (each with the minor page faults per run under ``faults``) and the quartiles
    of the per-pair speedup eager_i / fused_i, whose spread says how far a ratio near 1 can be trusted.
    """
    times, faults = alternated({"eager": eager, "fused": fused}, warmup, repeats)
    se, sf = summary(times["eager"]), summary(times["fused"])
    se["faults"], sf["faults"] = faults["eager"], faults["fused"]
    return se, sf, pair_ratios(times["eager"], times["fused"])


def gpu_quantiles_us(
    fn: Callable[[], object], grads: Optional[List[torch.Tensor]] = None, quick: bool = False
) -> Tuple[float, float, float]:
    """``(median, p20, p80)`` in microseconds of ``fn`` on the GPU by ``triton.testing.do_bench`` (CUDA events,
    L2 flushed between runs, the ``.grad`` of ``grads`` reset before each); warm-up / measuring budgets of
    25 / 100 ms, or 10 / 40 ms when ``quick``."""
    from triton.testing import do_bench

    warm, rep = (10, 40) if quick else (25, 100)
    med, p20, p80 = do_bench(fn, warmup=warm, rep=rep, grad_to_none=grads, quantiles=[0.5, 0.2, 0.8])
    return med * 1e3, p20 * 1e3, p80 * 1e3


def synchronized(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """``fn`` for a wall-clock timer: on a GPU the call waits for its kernels, or the timer would only see the
    launches."""
    if device == "cpu":
        return fn

    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out

    return synced
