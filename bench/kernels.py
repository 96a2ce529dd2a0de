#!/usr/bin/env python
"""Kernel benchmark: fused conv_relu_pool / backward / render against eager PyTorch and torch.compile.

For every layer of the 5-layer MNIST net and the 9-layer CIFAR-10 net
(docs/model.md#architectures-and-protocol), batch sizes and dtypes, it times (triton.testing.do_bench, median and
p20/p80, L2 flushed between runs):

- ``fwd``     conv_relu_pool forward (eager: max_pool2d(relu(conv2d)) with indices)
- ``fwdbwd``  forward + backward for x, weight, bias
- ``render``  top-down pass (eager: max_unpool2d of the masked values + conv_transpose2d)

for the drmm_kernels backends given by --backends (triton, cuda when available), eager,
torch.compile and, with --max-autotune, torch.compile(mode="max-autotune"). Reported per row:
achieved GB/s over the *algorithmic minimum bytes* (docs/kernels.md#roofline: read x, write y and 1 switch
byte, weights; backward adds reading dy and the switches and writing dx; render reads mu and the
switches and writes x_hat), TFLOP/s over the dense-equivalent FLOPs (2*N*Cout*Hc*Wc*Cin*k*k for the
forward and render, 3x that for forward+backward), and % of roofline = t_LB / t with
t_LB = max(FLOP / peak, bytes / bandwidth) for the dtype (H100 SXM peaks from docs/kernels.md#roofline).

``--check`` first compares every backend against the reference (float64) and exits non-zero on a
mismatch. Needs a CUDA GPU and exits with an error without one (``--list`` works anywhere).

Examples:
  python bench/kernels.py --quick --check
  python bench/kernels.py --layers mnist.L3,cifar.L3 --batch 256,1024 --dtype fp32,bf16 --max-autotune
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
for _path in (ROOT, BENCH):  # bench/suite loads this file by path: bench/ is then not on sys.path
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from drmm_kernels import testing as eager  # noqa: E402
from timing import gpu_quantiles_us  # noqa: E402
from drmm_kernels.contract import plain_pool  # noqa: E402


@dataclass(frozen=True)
class Layer:
    name: str
    cin: int
    cout: int
    hw: int  # input spatial size (square)
    k: int
    pad: int
    pool: int
    stride: int = 1

    @property
    def conv_hw(self) -> int:
        return (self.hw + 2 * self.pad - self.k) // self.stride + 1

    @property
    def pooled_hw(self) -> int:
        return self.conv_hw // self.pool


# docs/model.md#architectures-and-protocol. Global mean-pool layers (MNIST L5, CIFAR L9) are benchmarked as
# pool=1: the mean pool is not part of the fused op.
LAYERS = [
    Layer("mnist.L1", 1, 32, 28, 5, 4, 2),
    Layer("mnist.L2", 32, 64, 16, 3, 0, 1),
    Layer("mnist.L3", 64, 64, 14, 3, 2, 2),
    Layer("mnist.L4", 64, 128, 8, 3, 0, 1),
    Layer("mnist.L5", 128, 10, 6, 1, 0, 1),
    Layer("cifar.L1", 3, 96, 32, 3, 1, 1),
    Layer("cifar.L2", 96, 96, 32, 3, 2, 1),
    Layer("cifar.L3", 96, 96, 34, 3, 2, 2),
    Layer("cifar.L4", 96, 192, 18, 3, 0, 1),
    Layer("cifar.L5", 192, 192, 16, 3, 2, 1),
    Layer("cifar.L6", 192, 192, 18, 3, 0, 2),
    Layer("cifar.L7", 192, 192, 8, 3, 0, 1),
    Layer("cifar.L8", 192, 192, 6, 1, 0, 1),
    Layer("cifar.L9", 192, 10, 6, 1, 0, 1),
]
QUICK_LAYERS = ["mnist.L1", "mnist.L3", "cifar.L3", "cifar.L6"]
OPS = ("fwd", "fwdbwd", "render")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# docs/kernels.md#roofline (H100 SXM, computed from spec sheets, not measured). fp32 runs on TF32 tensor
# cores when torch.backends.cudnn.allow_tf32 is set (the default), which the bench keeps.
PEAKS = {
    "H100": {"bw": 3.0e12, "bf16": 990e12, "fp16": 990e12, "tf32": 495e12, "fp32": 67e12},
    "H200": {"bw": 4.8e12, "bf16": 990e12, "fp16": 990e12, "tf32": 495e12, "fp32": 67e12},
}


def die(msg: str, code: int = 2) -> None:
    print(f"bench/kernels.py: error: {msg}", file=sys.stderr)
    sys.exit(code)


# --------------------------------------------------------------------------- environment


def environment() -> Dict[str, str]:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "cuda_runtime": str(torch.version.cuda),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        env["triton"] = f"unavailable ({exc})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(
            gpu=p.name,
            sm=f"{p.major}.{p.minor}",
            sms=str(p.multi_processor_count),
            gpu_mem_gib=f"{p.total_memory / 2**30:.1f}",
        )
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout
            drv, clk, pwr = [s.strip() for s in out.strip().splitlines()[0].split(",")]
            env.update(driver=drv, max_sm_clock=clk, power_limit=pwr)
        except Exception:  # noqa: BLE001
            env["driver"] = "unknown (nvidia-smi failed)"
    try:
        import drmm_kernels as dk

        env["backends"] = {k: ("ok" if v.available else v.reason) for k, v in dk.available_backends().items()}
    except Exception as exc:  # noqa: BLE001
        env["backends"] = f"import failed: {exc}"
    return env


def peaks_for(gpu: str):
    for key, val in PEAKS.items():
        if key in gpu:
            return key, val
    return "H100 (assumed; unknown GPU)", PEAKS["H100"]


# --------------------------------------------------------------------------- roofline model


def flops(layer: Layer, n: int, op: str) -> float:
    f = 2.0 * n * layer.cout * layer.conv_hw**2 * layer.cin * layer.k**2
    return 3 * f if op == "fwdbwd" else f


def min_bytes(layer: Layer, n: int, op: str, esize: int) -> float:
    x = n * layer.cin * layer.hw**2 * esize
    y = n * layer.cout * layer.pooled_hw**2 * esize
    sw = n * layer.cout * layer.pooled_hw**2
    w = layer.cout * layer.cin * layer.k**2 * esize
    if op == "fwd":
        return x + y + sw + w
    if op == "render":
        return y + sw + x + w  # read mu, switches; write x_hat
    # forward, then dgrad (read dy, switches, write dx) and wgrad (read x, dy, switches, write dW),
    # each tensor counted once per pass that needs it
    return (x + y + sw + w) + (y + sw + x + w) + (x + y + sw + w)


def roofline(layer, n, op, dtype, peaks) -> float:
    key = {
        torch.float32: "tf32" if torch.backends.cudnn.allow_tf32 else "fp32",
        torch.bfloat16: "bf16",
        torch.float16: "fp16",
    }[dtype]
    esize = torch.empty((), dtype=dtype).element_size()
    return max(flops(layer, n, op) / peaks[key], min_bytes(layer, n, op, esize) / peaks["bw"])


# --------------------------------------------------------------------------- workloads


class Workload:
    """Tensors for one (layer, batch, dtype) and the callables of every implementation."""

    def __init__(self, layer: Layer, n: int, dtype: torch.dtype, device: str, seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)
        L = self.layer = layer
        self.n, self.dtype = n, dtype
        self.x = torch.randn(n, L.cin, L.hw, L.hw, device=device, dtype=dtype, generator=g)
        self.w = torch.randn(L.cout, L.cin, L.k, L.k, device=device, dtype=dtype, generator=g) / math.sqrt(
            L.cin * L.k * L.k
        )
        self.b = 0.1 * torch.randn(L.cout, device=device, dtype=dtype, generator=g)
        self.xg, self.wg, self.bg = (t.clone().requires_grad_() for t in (self.x, self.w, self.b))
        y, idx = self.eager_fwd(self.x, self.w, self.b)
        self.gy = torch.randn(y.shape, device=device, dtype=dtype, generator=g)
        self.mu = y.detach().clone()
        self.idx = idx
        self.amask = (y > 0).to(dtype)  # the `a` switch, as eager would compute it
        self.conv_size = (L.conv_hw, L.conv_hw)

    # eager PyTorch (drmm_kernels.testing) ----------------------------------------------------
    def eager_fwd(self, x, w, b):
        L = self.layer
        return eager.conv_relu_pool(x, w, stride=L.stride, padding=L.pad, pool=L.pool, bias=b)

    def eager_render(self, mu, idx, amask, w):
        L = self.layer
        return eager.render(mu, idx, w, (L.hw, L.hw), amask, None, L.stride, L.pad, L.pool, self.conv_size)

    # drmm_kernels ops --------------------------------------------------------------------
    def fused_fwd(self, x, w, b):
        import drmm_kernels as dk

        L = self.layer
        return dk.conv_relu_pool(x, w, None, b, stride=L.stride, padding=L.pad, pool=L.pool)

    def fused_render(self, mu, sw, w):
        import drmm_kernels as dk

        L = self.layer
        return dk.render(mu, sw, w, stride=L.stride, padding=L.pad, pool=L.pool, out_size=(L.hw, L.hw))

    def callables(self, impl: str) -> Dict[str, Callable[[], object]]:
        """``{op: fn}`` for impl in eager | compile | max-autotune | <drmm backend name>."""
        grads = [self.xg, self.wg, self.bg]

        def fwdbwd(fwd):
            def run():
                y = fwd(self.xg, self.wg, self.bg)[0]
                y.backward(self.gy)

            return run

        if impl in ("eager", "compile", "max-autotune"):
            fwd, render = self.eager_fwd, self.eager_render
            if impl != "eager":
                mode = None if impl == "compile" else "max-autotune"
                fwd = torch.compile(fwd, mode=mode, dynamic=False)
                render = torch.compile(render, mode=mode, dynamic=False)
            return {
                "fwd": lambda: fwd(self.x, self.w, self.b),
                "fwdbwd": fwdbwd(fwd),
                "render": lambda: render(self.mu, self.idx, self.amask, self.w),
                "_grads": grads,
            }
        import drmm_kernels as dk

        with dk.backend(impl):
            _, sw = self.fused_fwd(self.x, self.w, self.b)

        def scoped(fn):
            def run():
                with dk.backend(impl):
                    return fn()

            return run

        return {
            "fwd": scoped(lambda: self.fused_fwd(self.x, self.w, self.b)),
            "fwdbwd": scoped(fwdbwd(self.fused_fwd)),
            "render": scoped(lambda: self.fused_render(self.mu, sw, self.w)),
            "_grads": grads,
        }


# --------------------------------------------------------------------------- correctness


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def check(wl: Workload, backend: str) -> List[str]:
    """Differences of ``backend`` against the reference (float64); empty when it agrees."""
    import drmm_kernels as dk
    from drmm_kernels import reference

    L, problems = wl.layer, []
    tol = 2e-2 if wl.dtype != torch.float32 else (5e-3 if torch.backends.cudnn.allow_tf32 else 1e-4)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (wl.x, wl.w, wl.b))
    v = F.conv2d(xd, wd, bd, L.stride, L.pad)
    y_ref, sw_ref = reference.pool_switches(v.detach(), L.pool, 0.0)
    x, w, b = (t.detach().clone().requires_grad_() for t in (wl.x, wl.w, wl.b))
    with dk.backend(backend):
        y, sw = wl.fused_fwd(x, w, b)
    if (e := _rel(y, y_ref)) > tol:
        problems.append(f"fwd y rel err {e:.2e} > {tol:.0e}")
    if L.pool > 1:
        vv = v.detach()
        clear = eager.window_gap(vv, L.pool) > 2e-2 * vv.abs().max()
        bad = ((sw & 0x0F) != (sw_ref & 0x0F)) & clear
        if bad.any():
            problems.append(f"switch offsets differ in {int(bad.sum())} of {int(clear.sum())} clear windows")
    if ((sw & 0x70) != 0).any():
        problems.append("switch bits 4-6 not zero")
    # gradients given the recorded switches
    idx = reference.switches_to_indices(sw, L.pool, v.shape[-2:]).flatten(2)
    sel = F.relu(v).flatten(2).gather(2, idx).view(sw.shape)
    (sel * wl.gy.double()).sum().backward()
    with dk.backend(backend):
        y.backward(wl.gy)
    for name, got, exp in (("dx", x.grad, xd.grad), ("dW", w.grad, wd.grad), ("db", b.grad, bd.grad)):
        if (e := _rel(got, exp)) > tol:
            problems.append(f"fwdbwd {name} rel err {e:.2e} > {tol:.0e}")
    with dk.backend(backend):
        xh = wl.fused_render(wl.mu, sw, wl.w)
    xh_ref = reference.render(
        mu=wl.mu.double(),
        switches=sw,
        weight=wl.w.double(),
        scale=None,
        stride=L.stride,
        padding=L.pad,
        **plain_pool(L.pool),
        out_h=L.hw,
        out_w=L.hw,
        negative_slope=0.0,
    )
    if (e := _rel(xh, xh_ref)) > tol:
        problems.append(f"render rel err {e:.2e} > {tol:.0e}")
    return problems


def run(args) -> int:
    env = environment()
    peak_name, peaks = peaks_for(env.get("gpu", ""))
    env["peaks"] = f"{peak_name}: {peaks}"
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = not args.no_tf32
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 512)
    try:
        import drmm_kernels as dk
    except Exception as exc:  # noqa: BLE001
        die(f"cannot import drmm_kernels: {exc}")
    avail = dk.available_backends()
    backends = []
    for name in args.backends:
        if avail[name].available:
            backends.append(name)
        else:
            print(f"# backend {name} skipped: {avail[name].reason}", flush=True)
    impls = (
        backends
        + ["eager"]
        + ([] if args.no_compile else ["compile"])
        + (["max-autotune"] if args.max_autotune else [])
    )
    print(
        f"# {env.get('gpu')} driver {env.get('driver')} | torch {env['torch']} | triton {env['triton']} "
        f"| tf32 {torch.backends.cudnn.allow_tf32} | peaks {peak_name}",
        flush=True,
    )

    rows, failures = [], []
    for lname in args.layers:
        layer = next(L for L in LAYERS if L.name == lname)
        for n in args.batch:
            for dname in args.dtype:
                dtype = DTYPES[dname]
                try:
                    wl = Workload(layer, n, dtype, "cuda")
                except torch.OutOfMemoryError:
                    print(f"# {lname} n={n} {dname}: out of memory, skipped", flush=True)
                    continue
                if args.check:
                    for be in backends:
                        probs = check(wl, be)
                        status = "ok" if not probs else "MISMATCH: " + "; ".join(probs)
                        print(f"check {be:7s} {lname} n={n} {dname}: {status}", flush=True)
                        if probs:
                            failures.append(f"{be} {lname} n={n} {dname}: {'; '.join(probs)}")
                t_lb = {op: roofline(layer, n, op, dtype, peaks) for op in OPS}
                eager_t: Dict[str, float] = {}
                for impl in impls:
                    if args.check_only:
                        break
                    try:
                        fns = wl.callables(impl)
                    except Exception as exc:  # noqa: BLE001
                        print(f"# {impl} {lname}: setup failed: {type(exc).__name__}: {exc}", flush=True)
                        continue
                    for op in args.ops:
                        if impl == "max-autotune" and op not in args.max_autotune_ops:
                            continue
                        try:
                            grads = fns["_grads"] if op == "fwdbwd" else None
                            med, p20, p80 = gpu_quantiles_us(fns[op], grads, quick=args.quick)
                        except Exception as exc:  # noqa: BLE001
                            print(f"# {impl} {lname} {op}: failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                            continue
                        if impl == "eager":
                            eager_t[op] = med
                        esize = torch.empty((), dtype=dtype).element_size()
                        row = dict(
                            layer=lname,
                            batch=n,
                            dtype=dname,
                            op=op,
                            impl=impl,
                            median_us=med,
                            p20_us=p20,
                            p80_us=p80,
                            gbps=min_bytes(layer, n, op, esize) / (med * 1e-6) / 1e9,
                            tflops=flops(layer, n, op) / (med * 1e-6) / 1e12,
                            pct_roofline=100.0 * t_lb[op] * 1e6 / med,
                            speedup_vs_eager=(eager_t[op] / med) if op in eager_t else None,
                        )
                        rows.append(row)
                        print(fmt_row(row), flush=True)
                # eager is timed after the backends; fill in their speedups now
                for row in rows:
                    if (row["layer"], row["batch"], row["dtype"]) == (lname, n, dname) and row["op"] in eager_t:
                        row["speedup_vs_eager"] = eager_t[row["op"]] / row["median_us"]
                del wl
                torch.cuda.empty_cache()
                write_results(args, env, rows, failures, quiet=True)  # partial results survive a timeout

    write_results(args, env, rows, failures)
    if failures:
        print("\nFAILED checks:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def fmt_row(r) -> str:
    sp = f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else "-"
    return (
        f"{r['layer']:9s} n={r['batch']:<5d} {r['dtype']:4s} {r['op']:7s} {r['impl']:12s} "
        f"{r['median_us']:9.1f} us  [{r['p20_us']:.1f}, {r['p80_us']:.1f}]  {r['gbps']:7.0f} GB/s  "
        f"{r['tflops']:6.1f} TFLOP/s  {r['pct_roofline']:5.1f}% roof  vs eager {sp}"
    )


def write_results(args, env, rows, failures, quiet: bool = False) -> None:
    os.makedirs(args.out, exist_ok=True)
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", env.get("gpu", "cpu")).strip("-")
    if not args.name:  # fixed once, so incremental writes go to the same files
        args.name = f"kernels-{gpu}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    stem = args.name
    meta = dict(
        env=env,
        args={k: v for k, v in vars(args).items()},
        failures=failures,
        notes="median of triton.testing.do_bench (L2 flushed between runs); GB/s over algorithmic "
        "minimum bytes; TFLOP/s over dense-equivalent FLOPs; % roofline = t_LB / t "
        "(docs/kernels.md#roofline peaks)",
    )
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1, default=str)
    lines = [
        f"# Kernel benchmark: {env.get('gpu')} (driver {env.get('driver')}), torch {env['torch']}, "
        f"triton {env['triton']}, CUDA {env['cuda_runtime']}",
        "",
        f"{env['date']}; TF32 {'on' if not args.no_tf32 else 'off'} for fp32; peaks {env.get('peaks')}.",
        "",
        "| layer | batch | dtype | op | impl | median µs | p20–p80 µs | GB/s | TFLOP/s | % roofline | vs eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp = f"{r['speedup_vs_eager']:.2f}×" if r.get("speedup_vs_eager") else "–"
        lines.append(
            f"| {r['layer']} | {r['batch']} | {r['dtype']} | {r['op']} | {r['impl']} | "
            f"{r['median_us']:.1f} | {r['p20_us']:.1f}–{r['p80_us']:.1f} | {r['gbps']:.0f} | "
            f"{r['tflops']:.1f} | {r['pct_roofline']:.1f} | {sp} |"
        )
    if failures:
        lines += ["", "**Check failures:**", ""] + [f"- {f}" for f in failures]
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if not quiet:
        print(f"# wrote {os.path.join(args.out, stem)}.{{json,md}}", flush=True)


def _csv(kind, choices=None):
    def parse(s: str):
        items = [i.strip() for i in s.split(",") if i.strip()]
        out = [kind(i) for i in items]
        if choices is not None:
            bad = [i for i in out if i not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad} not in {list(choices)}")
        return out

    return parse


def parse_args(argv=None):
    names = [L.name for L in LAYERS]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--backends",
        type=_csv(str, ("triton", "cuda", "cpu", "reference")),
        default=["triton", "cuda"],
        help="drmm_kernels backends to time (unavailable ones are skipped with a note)",
    )
    p.add_argument(
        "--layers",
        type=_csv(str, names + ["all", "mnist", "cifar"]),
        default=None,
        help="comma list of " + ", ".join(names) + " (or all/mnist/cifar)",
    )
    p.add_argument("--batch", type=_csv(int), default=None, help="default 256,1024 (--quick: 256)")
    p.add_argument("--dtype", type=_csv(str, DTYPES), default=["fp32", "bf16"])
    p.add_argument("--ops", type=_csv(str, OPS), default=list(OPS))
    p.add_argument("--quick", action="store_true", help=f"layers {','.join(QUICK_LAYERS)}, batch 256, short timing")
    p.add_argument("--max-autotune", action="store_true", help='add torch.compile(mode="max-autotune") (slow)')
    p.add_argument(
        "--max-autotune-ops",
        type=_csv(str, OPS),
        default=list(OPS),
        help="ops that get the max-autotune column (compiling them is what is slow)",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--no-tf32", action="store_true", help="fp32 without TF32 (cudnn.allow_tf32 = False)")
    p.add_argument(
        "--check", action="store_true", help="compare every backend with the reference first; exit 1 on a mismatch"
    )
    p.add_argument("--check-only", action="store_true", help="--check without timing")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--name", default=None, help="file stem of the results (default kernels-<gpu>-<time>)")
    p.add_argument("--list", action="store_true", help="print the layer table and exit (no GPU needed)")
    args = p.parse_args(argv)
    if args.layers is None or "all" in args.layers:
        args.layers = QUICK_LAYERS if (args.quick and args.layers is None) else names
    else:
        expanded = []
        for n in args.layers:
            expanded += [m for m in names if m.startswith(n + ".")] if n in ("mnist", "cifar") else [n]
        args.layers = expanded
    if args.batch is None:
        args.batch = [256] if args.quick else [256, 1024]
    args.check = args.check or args.check_only
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        print(f"{'layer':9s} {'Cin':>4s} {'Cout':>4s} {'H':>3s} {'k':>2s} {'pad':>3s} {'pool':>4s}  conv  pooled")
        for L in LAYERS:
            print(
                f"{L.name:9s} {L.cin:4d} {L.cout:4d} {L.hw:3d} {L.k:2d} {L.pad:3d} {L.pool:4d}  "
                f"{L.conv_hw:4d}  {L.pooled_hw:6d}"
            )
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        die("TRITON_INTERPRET is set; unset it to benchmark compiled kernels")
    if not torch.cuda.is_available():
        die(
            "no CUDA device is visible: this benchmark times GPU kernels (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda}); use --list to see the layers"
        )
    t0 = time.time()
    rc = run(args)
    print(f"# bench/kernels.py finished in {time.time() - t0:.0f} s, exit {rc}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
