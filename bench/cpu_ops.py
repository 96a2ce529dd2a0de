"""CPU benchmark of the ``cpu`` backend against eager PyTorch on the 5-layer MNIST net (batch 256).

For each layer it measures, with ``torch.set_num_threads(2)`` by default:

- forward: ``drmm_kernels.conv_relu_pool`` (cpu backend) vs eager
  ``max_pool2d(relu(conv2d(x, w, b)), pool, return_indices=True)`` (``relu(conv2d)`` without pooling);
- forward + backward (gradients for x, w and b) of the same two;
- render: ``drmm_kernels.render`` vs eager ``max_unpool2d`` + mask + ``conv_transpose2d``;
- bytes saved for backward beyond the input and the parameters (unique storages seen by
  ``torch.autograd.graph.saved_tensors_hooks``).

Times are medians over ``--repeats`` runs after ``--warmup`` runs; eager and cpu runs alternate so that a
change of machine load (other processes) affects both alike. Prints a markdown table and writes
``bench/results/<out>.json`` and ``bench/results/<out>.md`` (``--out``, default ``cpu_ops``).

Large temporaries are page-faulted in anew on many calls under glibc's default malloc settings, which adds up
to half of a layer's time here, to eager and fused alike but not equally (see RETAIN_TUNABLES). The table
gives the page faults per forward+backward; ``--allocator retain`` times both sides without them.

    .venv/bin/python bench/cpu_ops.py [--batch 256] [--threads 2] [--repeats 20] [--layers 1,3]
                                      [--allocator system|retain] [--out cpu_ops]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable, Dict, List

import torch

import drmm_kernels
from drmm_kernels import testing as eager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")

# (name, C_in, C_out, kernel, padding, input size, pool) of the 5-layer MNIST net ("conv_small"), from the one
# layer table of the benchmarks (bench/kernels.py; bench/suite reads it too).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import LAYERS as _ALL_LAYERS  # noqa: E402
from timing import paired  # noqa: E402

LAYERS = [
    (layer.name.split(".", 1)[1], layer.cin, layer.cout, layer.k, layer.pad, layer.hw, layer.pool)
    for layer in _ALL_LAYERS
    if layer.name.startswith("mnist.")
]

# Targets of the issue: pooled layers fwd+bwd >= 1.3x, render >= 1.5x, saved bytes <= 1/3 of eager;
# layers without pooling no slower than eager (speedup >= 1.0).
TARGETS = {"pooled": {"fwd_bwd": 1.3, "render": 1.5, "saved_ratio": 1 / 3}, "unpooled": {"fwd_bwd": 1.0, "render": 1.0}}


def _shape_label(spec) -> str:
    name, cin, cout, k, pad, size, pool = spec
    return f"{cin}->{cout} k{k} p{pad} {size}x{size} pool{pool}"


def saved_bytes(fn: Callable[[], object], exclude: List[torch.Tensor]) -> int:
    """Bytes of the unique storages autograd saves while running ``fn``, excluding those of ``exclude``."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def bench_layer(spec, batch: int, warmup: int, repeats: int, dtype: torch.dtype) -> Dict[str, object]:
    name, cin, cout, k, pad, size, pool = spec
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=g, dtype=dtype)
    w = torch.randn(cout, cin, k, k, generator=g, dtype=dtype) * (2.0 / (cin * k * k)) ** 0.5
    b = torch.randn(cout, generator=g, dtype=dtype) * 0.1
    conv_hw = (size + 2 * pad - k + 1,) * 2
    out_hw = (conv_hw[0] // pool, conv_hw[1] // pool)
    gy = torch.randn(batch, cout, *out_hw, generator=g, dtype=dtype)

    def eager_fwd(xx, ww, bb):
        return eager.conv_relu_pool(xx, ww, stride=1, padding=pad, pool=pool, bias=bb)

    def fused_fwd(xx, ww, bb):
        with drmm_kernels.backend("cpu"):
            return drmm_kernels.conv_relu_pool(xx, ww, None, bb, stride=1, padding=pad, pool=pool)

    xg, wg, bg = (t.clone().requires_grad_(True) for t in (x, w, b))

    def run_bwd(fwd):
        def go():
            for t in (xg, wg, bg):
                t.grad = None
            y, _ = fwd(xg, wg, bg)
            y.backward(gy)

        return go

    # Correctness guard: the numbers below are only meaningful if both compute the same thing.
    with torch.no_grad():
        ye, idx = eager_fwd(x, w, b)
        yf, sw = fused_fwd(x, w, b)
    torch.testing.assert_close(yf, ye, rtol=1e-4, atol=1e-4)

    res: Dict[str, object] = {"layer": name, "shape": _shape_label(spec), "pool": pool}
    with torch.no_grad():
        res["fwd_eager"], res["fwd_cpu"], res["fwd_pair_x"] = paired(
            lambda: eager_fwd(x, w, b), lambda: fused_fwd(x, w, b), warmup, repeats
        )
    res["fwd_bwd_eager"], res["fwd_bwd_cpu"], res["fwd_bwd_pair_x"] = paired(
        run_bwd(eager_fwd), run_bwd(fused_fwd), warmup, repeats
    )

    # Render: the top-down pass from the forward's output and switches (the masked unpool + transposed
    # conv), eager from the int64 indices and the a-mask it has to keep.
    mu = torch.randn(batch, cout, *out_hw, generator=g, dtype=dtype)
    mask = (ye > 0).to(dtype)

    def eager_render():
        return eager.render(mu, idx, w, (size, size), mask, None, 1, pad, pool, conv_hw)

    def fused_render():
        with drmm_kernels.backend("cpu"):
            return drmm_kernels.render(mu, sw, w, stride=1, padding=pad, pool=pool, out_size=(size, size))

    with torch.no_grad():
        torch.testing.assert_close(fused_render(), eager_render(), rtol=1e-3, atol=1e-3)
        res["render_eager"], res["render_cpu"], res["render_pair_x"] = paired(
            eager_render, fused_render, warmup, repeats
        )

    res["saved_eager"] = saved_bytes(lambda: eager_fwd(xg, wg, bg), [xg, wg, bg])
    res["saved_cpu"] = saved_bytes(lambda: fused_fwd(xg, wg, bg), [xg, wg, bg])

    for key in ("fwd", "fwd_bwd", "render"):
        # The median of the per-pair ratios: pairs are timed back to back, so load drift cancels in each ratio.
        res[f"{key}_speedup"] = res[f"{key}_pair_x"]["median"]
        res[f"{key}_ratio_of_medians"] = res[f"{key}_eager"]["median_ms"] / res[f"{key}_cpu"]["median_ms"]
    res["saved_ratio"] = res["saved_cpu"] / res["saved_eager"] if res["saved_eager"] else float("nan")
    tgt = TARGETS["pooled" if pool > 1 else "unpooled"]
    met = {k: res[f"{k}_speedup"] >= v for k, v in tgt.items() if k != "saved_ratio"}
    if "saved_ratio" in tgt:
        met["saved_ratio"] = res["saved_ratio"] <= tgt["saved_ratio"]
    res["targets"] = tgt
    res["targets_met"] = met
    return res


def fmt_ms(r: Dict[str, float]) -> str:
    return f"{r['median_ms']:.1f}"


def bench_bn_layer(spec, batch: int, warmup: int, repeats: int, dtype: torch.dtype) -> Dict[str, object]:
    """Training-mode ``conv_bn_relu_pool`` (batch statistics, gradients through them) forward + backward against
    eager ``max_pool2d(relu(batch_norm(conv2d(x, w))), return_indices=True)``."""
    name, cin, cout, k, pad, size, pool = spec
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cin, size, size, generator=g, dtype=dtype, requires_grad=True)
    w = (torch.randn(cout, cin, k, k, generator=g, dtype=dtype) * (2.0 / (cin * k * k)) ** 0.5).requires_grad_(True)
    gamma = (torch.rand(cout, generator=g, dtype=dtype) + 0.5).requires_grad_(True)
    beta = (torch.randn(cout, generator=g, dtype=dtype) * 0.1).requires_grad_(True)
    stats = {side: (torch.zeros(cout, dtype=dtype), torch.ones(cout, dtype=dtype)) for side in ("eager", "cpu")}
    conv_hw = size + 2 * pad - k + 1
    gy = torch.randn(batch, cout, conv_hw // pool, conv_hw // pool, generator=g, dtype=dtype)

    def eager_fwd():
        rm, rv = stats["eager"]
        return eager.conv_bn_relu_pool(x, w, gamma, beta, rm, rv, True, 0.1, 1e-5, padding=pad, pool=pool)[0]

    def fused_fwd():
        rm, rv = stats["cpu"]
        with drmm_kernels.backend("cpu"):
            return drmm_kernels.conv_bn_relu_pool(
                x, w, gamma, beta, rm, rv, training=True, momentum=0.1, eps=1e-5, padding=pad, pool=pool
            )[0]

    def step(fwd):
        def go():
            for t in (x, w, gamma, beta):
                t.grad = None
            fwd().backward(gy)

        return go

    torch.testing.assert_close(fused_fwd(), eager_fwd(), rtol=1e-4, atol=1e-4)
    res: Dict[str, object] = {"layer": name, "shape": _shape_label(spec)}
    res["bn_fwd_bwd_eager"], res["bn_fwd_bwd_cpu"], res["bn_fwd_bwd_pair_x"] = paired(
        step(eager_fwd), step(fused_fwd), warmup, repeats
    )
    res["bn_fwd_bwd_speedup"] = res["bn_fwd_bwd_pair_x"]["median"]
    res["bn_saved_eager"] = saved_bytes(eager_fwd, [x, w, gamma, beta])
    res["bn_saved_cpu"] = saved_bytes(fused_fwd, [x, w, gamma, beta])
    return res


def bn_table(results: List[Dict[str, object]]) -> str:
    rows = [
        "| layer | shape | BN fwd+bwd eager / cpu ms | x (IQR) | page faults per run eager / cpu | "
        "saved eager / cpu MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['layer']} | {r['shape']} | {fmt_ms(r['bn_fwd_bwd_eager'])} / {fmt_ms(r['bn_fwd_bwd_cpu'])} "
            f"| {_x(r, 'bn_fwd_bwd')} | {r['bn_fwd_bwd_eager']['faults']:.0f} / "
            f"{r['bn_fwd_bwd_cpu']['faults']:.0f} | {r['bn_saved_eager'] / 2**20:.2f} / "
            f"{r['bn_saved_cpu'] / 2**20:.2f} |"
        )
    return "\n".join(rows)


def _x(r: Dict[str, object], key: str) -> str:
    q = r[f"{key}_pair_x"]
    return f"{r[f'{key}_speedup']:.2f} ({q['q1']:.2f}-{q['q3']:.2f})"


def table(results: List[Dict[str, object]]) -> str:
    head = (
        "| layer | shape | fwd eager / cpu ms | fwd x (IQR) | fwd+bwd eager / cpu ms | fwd+bwd x (IQR) "
        "| render eager / cpu ms | render x (IQR) | page faults per fwd+bwd eager / cpu | saved eager / cpu MiB "
        "(ratio) | targets |"
    )
    sep = "|" + "---|" * (head.count("|") - 1)
    rows = [head, sep]
    for r in results:
        met = r["targets_met"]
        tg = ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met.items())
        rows.append(
            f"| {r['layer']} | {r['shape']} | {fmt_ms(r['fwd_eager'])} / {fmt_ms(r['fwd_cpu'])} | {_x(r, 'fwd')} | "
            f"{fmt_ms(r['fwd_bwd_eager'])} / {fmt_ms(r['fwd_bwd_cpu'])} | {_x(r, 'fwd_bwd')} | "
            f"{fmt_ms(r['render_eager'])} / {fmt_ms(r['render_cpu'])} | {_x(r, 'render')} | "
            f"{r['fwd_bwd_eager']['faults']:.0f} / {r['fwd_bwd_cpu']['faults']:.0f} | "
            f"{r['saved_eager'] / 2**20:.2f} / {r['saved_cpu'] / 2**20:.2f} ({r['saved_ratio']:.3f}) | {tg} |"
        )
    return "\n".join(rows)


# glibc returns freed blocks above its (adaptive, at most 32 MiB) mmap threshold to the kernel, so every call
# that allocates such a temporary -- oneDNN's NCHW convolutions do -- page-faults it in again (the faults column
# of bench/results/cpu_ops.md), and the count depends on the allocator's history. "retain"
# re-runs the benchmark with glibc told to keep freed memory (as jemalloc/tcmalloc do), so that both sides are
# timed without most of those faults (blocks over 64 MiB from other threads' arenas are still mapped anew).
RETAIN_TUNABLES = "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295"


def _reexec_with_retained_memory(argv: List[str]) -> None:
    """Runs this script again, with ``argv``, in a process whose glibc keeps freed memory; returns if this is it."""
    if RETAIN_TUNABLES in os.environ.get("GLIBC_TUNABLES", ""):
        return
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        raise SystemExit("--allocator retain needs Linux with glibc (it sets GLIBC_TUNABLES)")
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), RETAIN_TUNABLES) if t)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + list(argv), env)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--layers", default="", help="comma-separated subset, e.g. 1,3 (default: all)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--no-save", action="store_true", help="print only; do not write bench/results")
    ap.add_argument(
        "--allocator",
        default="system",
        choices=("system", "retain"),
        help="system: glibc as configured; retain: re-run with glibc keeping freed memory, so that no "
        "side pays page faults for re-allocated temporaries (see RETAIN_TUNABLES)",
    )
    ap.add_argument("--no-bn", action="store_true", help="skip the training-mode conv_bn_relu_pool rows")
    ap.add_argument("--out", default="cpu_ops", help="result file stem under bench/results (default: cpu_ops)")
    args = ap.parse_args(argv)
    if args.allocator == "retain":
        _reexec_with_retained_memory(sys.argv[1:] if argv is None else argv)

    torch.set_num_threads(args.threads)
    if not drmm_kernels.available_backends()["cpu"]:
        print(f"cpu backend unavailable: {drmm_kernels.available_backends()['cpu'].reason}", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    chosen = {int(s) for s in args.layers.split(",") if s.strip()} or set(range(1, len(LAYERS) + 1))
    load = os.getloadavg()
    results, bn_results = [], []
    for i, spec in enumerate(LAYERS, 1):
        if i in chosen:
            results.append(bench_layer(spec, args.batch, args.warmup, args.repeats, dtype))
            if not args.no_bn:
                bn_results.append(bench_bn_layer(spec, args.batch, args.warmup, args.repeats, dtype))
            print(f"{spec[0]} done", file=sys.stderr)
    load_after = os.getloadavg()
    md = table(results)
    if bn_results:
        md += (
            "\n\nTraining-mode batch norm, `conv_bn_relu_pool(..., training=True)` forward + backward (gradients "
            "for x, w, gamma, beta) vs eager `max_pool2d(relu(batch_norm(conv2d(x, w))))`:\n\n" + bn_table(bn_results)
        )
    cpu_name = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    meta = {
        "batch": args.batch,
        "threads": args.threads,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "cpu": cpu_name,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_before": load,
        "loadavg_after": load_after,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "allocator": args.allocator,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    header = (
        f"CPU ops benchmark: batch {args.batch}, {args.threads} threads, {args.dtype}, median of "
        f"{args.repeats} runs; allocator {args.allocator}; {cpu_name}; torch {torch.__version__}; load "
        f"average before {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, after {load_after[0]:.2f}. Speedup x = "
        f"median over the back-to-back pairs of eager_i / cpu_i (> 1: cpu backend faster), in brackets its "
        f"quartiles; saved ratio = cpu / eager bytes saved for backward beyond x and the parameters. "
        f"Targets: pooled layers fwd+bwd >= 1.3x, render >= 1.5x, saved ratio <= 1/3; unpooled layers >= 1.0x."
    )
    print(header)
    print()
    print(md)
    if not args.no_save:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, f"{args.out}.json"), "w") as f:
            json.dump({"meta": meta, "results": results, "bn_results": bn_results}, f, indent=2)
        with open(os.path.join(RESULTS, f"{args.out}.md"), "w") as f:
            f.write(f"{header}\n\nCommand: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`\n\n{md}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
