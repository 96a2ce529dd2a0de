"""The eager baseline and the timing loop are written once (issue 25.5): the eager PyTorch compositions the fused
ops are compared with live in drmm_kernels/testing.py, the timing of every benchmark in bench/timing.py; the
tests and the benchmarks call them instead of spelling them out again."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Calls that make an eager composition of the ops (the forward's indexed pooling, batch norm, the render's unpool
# and transposed convolution) or a timing loop.
EAGER = {"max_unpool2d", "conv_transpose2d", "batch_norm"}
TIMING = {"perf_counter", "do_bench"}


def _calls(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            indices = any(k.arg == "return_indices" for k in node.keywords)
            yield node.lineno, ("max_pool2d(return_indices)" if name == "max_pool2d" and indices else name)


def _found(paths, names):
    return [f"{p.relative_to(ROOT)}:{line}: {name}" for p in paths for line, name in _calls(p) if name in names]


def test_bench_has_no_eager_composition_or_timing_loop_of_its_own():
    paths = [p for p in sorted((ROOT / "bench").rglob("*.py")) if p != ROOT / "bench" / "timing.py"]
    assert paths, "bench/ has no Python files?"
    names = EAGER | TIMING | {"max_pool2d(return_indices)"}
    assert not _found(paths, names), "use drmm_kernels.testing / bench/timing.py instead"


def test_tests_render_through_the_one_eager_render():
    paths = sorted((ROOT / "tests").rglob("*.py"))
    assert not _found(paths, {"max_unpool2d", "conv_transpose2d"}), "use drmm_kernels.testing.render instead"


def test_the_baseline_uses_no_package_code():
    """drmm_kernels.testing is ground truth: it imports torch and nothing of drmm_kernels."""
    tree = ast.parse((ROOT / "drmm_kernels" / "testing.py").read_text())
    imported = {
        (n.module or "") if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    assert all(m.split(".")[0] in ("__future__", "typing", "torch") for m in imported), imported
