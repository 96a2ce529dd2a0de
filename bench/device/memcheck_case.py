#!/usr/bin/env python
"""One small case of every kernel family of one backend, checked against the reference backend.

Run under ``compute-sanitizer --tool memcheck`` by ``bench/device_check.sh`` (with
``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that every tensor is its own allocation and an out-of-bounds
access cannot land silently inside a cached block). Only public ``drmm_kernels`` functions are
used, under ``drmm_kernels.backend(name)``, so the script does not depend on the package's internal
layout:

- ``conv_relu_pool`` forward and backward (the render-with-scale input gradient, the gathered weight
  gradient), with and without leaky slope, pool 1 and 2, an odd-sized input (dropped trailing row);
- ``render`` forward and backward (its input gradient is the gathered conv, its weight gradient the
  render weight-gradient kernel);
- ``conv_bn_relu_pool`` in training mode (batch statistics, the normalize-pool epilogue, the unpool
  backward) and in eval mode.

Each in float64, float32 without TF32 (the exact kernels), float32 with TF32 and bfloat16.
Values are compared with the reference backend in float64 given the *same* switches, so window ties
cannot make a mismatch. Exit status 1 on a mismatch; compute-sanitizer turns a memory error into its
own exit code.

    python bench/device/memcheck_case.py cuda            # on a GPU
    python bench/device/memcheck_case.py cpu --device cpu  # the same checks on CPU (dry run)
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import drmm_kernels as dk  # noqa: E402

# (label, dtype, TF32 on, relative tolerance against float64)
PRECISIONS = (
    ("fp64", torch.float64, False, 1e-9),
    ("fp32-exact", torch.float32, False, 1e-4),
    ("fp32-tf32", torch.float32, True, 2e-2),
    ("bf16", torch.bfloat16, False, 4e-2),
)
# (cin, cout, kernel, padding, stride, pool, negative_slope, H, W)
GEOMETRIES = (
    (8, 16, 3, 1, 1, 2, 0.0, 11, 9),
    (3, 20, 5, 2, 2, 2, 0.1, 13, 12),
    (24, 10, 1, 0, 1, 1, 0.0, 7, 6),
)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def grads(out: torch.Tensor, upstream: torch.Tensor, inputs):
    return torch.autograd.grad(out, inputs, upstream)


def check_layer(name, device, dtype, tol, geom, gen):
    cin, cout, k, pad, stride, pool, slope, h, w = geom

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)

    x64, w64, sc64, sh64 = rand(2, cin, h, w), rand(cout, cin, k, k) / k, rand(cout), rand(cout)
    x, wt, sc, sh = (t.to(dtype).requires_grad_() for t in (x64, w64, sc64, sh64))
    kw = dict(stride=stride, padding=pad, pool=pool, negative_slope=slope)
    results = []

    with dk.backend(name):
        y, sw = dk.conv_relu_pool(x, wt, sc, sh, **kw)
        g = rand(*y.shape).to(dtype)
        dx, dw = grads(y, g, (x, wt))
        mu = rand(*y.shape).to(dtype).requires_grad_()
        xr = dk.render(mu, sw, wt, None, out_size=(h, w), **kw)
        gr = rand(*xr.shape).to(dtype)
        dmu, dwr = grads(xr, gr, (mu, wt))
        bn_w, bn_b = (rand(cout).to(dtype).requires_grad_() for _ in range(2))
        rm, rv = torch.zeros(cout, device=device, dtype=dtype), torch.ones(cout, device=device, dtype=dtype)
        yb, swb = dk.conv_bn_relu_pool(x, wt, bn_w, bn_b, rm, rv, training=True, **kw)[:2]
        gb = rand(*yb.shape).to(dtype)
        dxb, dwb = grads(yb, gb, (x, wt))
        ye = dk.conv_bn_relu_pool(x, wt, bn_w, bn_b, rm, rv, training=False, **kw)[0]
        if device == "cuda":
            torch.cuda.synchronize()

    # Expected values in float64 on the CPU reference, given the switches the backend recorded.
    cpu = lambda t: t.detach().double().cpu().requires_grad_()  # noqa: E731
    X, W, SC, SH, MU = cpu(x), cpu(wt), cpu(sc), cpu(sh), cpu(mu)
    SW = sw.cpu()
    with dk.backend("reference"):
        Y, _ = dk.conv_relu_pool(X, W, SC, SH, **kw)
        results.append(("conv_relu_pool y", rel_err(y, Y)))
        dX = dk.render(g.double().cpu(), SW, W, SC, out_size=(h, w), **kw)
        results.append(("conv_relu_pool dx (render with scale)", rel_err(dx, dX)))
        XR = dk.render(MU, SW, W, None, out_size=(h, w), **kw)
        results.append(("render x_hat", rel_err(xr, XR)))
        dMU, dWR = grads(XR, gr.double().cpu(), (MU, W))
        results.append(("render dmu (gathered conv)", rel_err(dmu, dMU)))
        results.append(("render dW (weight gradient)", rel_err(dwr, dWR)))
    for label, t in (
        ("conv_relu_pool dW", dw),
        ("conv_bn_relu_pool train y", yb),
        ("conv_bn_relu_pool train dx", dxb),
        ("conv_bn_relu_pool train dW", dwb),
        ("conv_bn_relu_pool eval y", ye),
        ("running_var", rv),
    ):
        # No float64 twin with the same switches for these (the batch statistics decide the windows);
        # the tests compare them; here they must at least be finite, and the sanitizer watches the access.
        results.append((label + " finite", 0.0 if torch.isfinite(t.float()).all() else float("inf")))
    return [(lab, err, err <= tol) for lab, err in results]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backend", choices=("cuda", "triton", "cpu", "reference"))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument(
        "--precisions",
        default=",".join(p_[0] for p_ in PRECISIONS),
        help="comma-separated subset of " + ",".join(p_[0] for p_ in PRECISIONS),
    )
    args = p.parse_args()
    status = dk.available_backends()[args.backend]
    if not status.available:
        print(f"memcheck_case: backend {args.backend} is not available: {status.reason}")
        return 1
    wanted = args.precisions.split(",")
    unknown = sorted(set(wanted) - {p_[0] for p_ in PRECISIONS})
    if unknown:
        p.error(f"--precisions: unknown {unknown}")
    bad = 0
    gen = torch.Generator().manual_seed(0)
    for label, dtype, tf32, tol in PRECISIONS:
        if label not in wanted or (args.device == "cpu" and dtype == torch.bfloat16 and args.backend == "triton"):
            continue
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for geom in GEOMETRIES:
            for what, err, ok in check_layer(args.backend, args.device, dtype, tol, geom, gen):
                bad += not ok
                detail = "" if what.endswith(" finite") else f": rel err {err:.1e}"
                verdict = "ok" if ok else ("NOT FINITE" if err == float("inf") else f"MISMATCH (tol {tol:.0e})")
                print(f"{args.backend} {label} geom={geom}: {what}{detail} {verdict}")
    print(f"memcheck_case {args.backend}: {'FAILED, %d mismatches' % bad if bad else 'all ok'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
