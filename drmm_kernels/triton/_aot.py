"""Compile the Triton kernels for a GPU target without a GPU (PTX + cubin through triton's bundled ptxas).

The interpreter runs the kernels' Python semantics only; this catches what it cannot: type errors in
the compiled frontend, invalid dot shapes, shared-memory overflow of a config. Run with TRITON_INTERPRET
unset:

    python -m drmm_kernels.triton._aot            # first autotune config of every kernel variant, sm_90
    python -m drmm_kernels.triton._aot --all      # every config (a few minutes)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

H100_SMEM = 227 * 1024  # max dynamic shared memory per block on sm_90


def _variants():
    """(label, kernel, arg types, constexprs) for every kernel family, fp32 and bf16."""
    from . import conv_bn_relu_pool_kernel, conv_relu_pool_kernel, render_kernel, render_wgrad_kernel

    for dt in ("fp32", "bf16"):
        p, tf32 = f"*{dt}", dt == "fp32"
        i = "i32"
        fwd_types = dict(
            x_ptr=p,
            w_ptr=p,
            scale_ptr=p,
            shift_ptr=p,
            sw_ptr="*u8",
            y_ptr=p,
            P=i,
            C_in=i,
            C_out=i,
            Hin=i,
            Win=i,
            Hp=i,
            Wp=i,
            Ho=i,
            Wo=i,
            pad=i,
            slope="fp32",
            sxn="i64",
            sxc=i,
            sxh=i,
            sxw=i,
            swo=i,
            swi=i,
            swh=i,
            sww=i,
        )
        # the plain 2x2 pool and ResNet's overlapping, padded 3/2/1 one
        windows = (dict(POOL=2, PS=2, PP=0), dict(POOL=3, PS=2, PP=1))
        for gather in (False, True):
            for flat, window in ((False, windows[0]), (True, windows[0]), (False, windows[1])):
                yield (
                    f"conv_relu_pool {dt} gather={gather} flat_k={flat} pool={tuple(window.values())}",
                    conv_relu_pool_kernel._conv_pool_kernel,
                    fwd_types,
                    dict(
                        KH=3,
                        KW=3,
                        STRIDE=1,
                        **window,
                        HAS_SCALE=True,
                        HAS_SHIFT=True,
                        LEAKY=False,
                        GATHER=gather,
                        FLAT_K=flat,
                        TF32=tf32,
                        UPCAST=False,
                    ),
                )
        dg_types = dict(
            mu_ptr=p,
            sw_ptr="*u8",
            w_ptr=p,
            scale_ptr=p,
            out_ptr=p,
            M=i,
            C_in=i,
            C_out=i,
            H=i,
            W=i,
            Hp=i,
            Wp=i,
            pad=i,
            slope="fp32",
            smn=i,
            smc=i,
            smh=i,
            smw=i,
            ssn=i,
            ssc=i,
            ssh=i,
            ssw=i,
            swo=i,
            swi=i,
            swh=i,
            sww=i,
        )
        for stride, window in ((1, windows[0]), (2, windows[0]), (1, windows[1])):
            yield (
                f"render {dt} stride={stride} pool={tuple(window.values())}",
                render_kernel._render_kernel,
                dg_types,
                dict(
                    KH=3,
                    KW=3,
                    STRIDE=stride,
                    **window,
                    NWIN=-(-window["POOL"] // window["PS"]),
                    HAS_SCALE=True,
                    TF32=tf32,
                    UPCAST=False,
                ),
            )
        wg_types = dict(
            src_ptr=p,
            mu_ptr=p,
            sw_ptr="*u8",
            scale_ptr=p,
            part_ptr="*fp32",
            P=i,
            C_in=i,
            C_out=i,
            Hin=i,
            Win=i,
            Hp=i,
            Wp=i,
            pad=i,
            slope="fp32",
            chunk=i,
            sxn=i,
            sxc=i,
            sxh=i,
            sxw=i,
            smn=i,
            smc=i,
            smh=i,
            smw=i,
            ssn=i,
            ssc=i,
            ssh=i,
            ssw=i,
        )
        for window in windows:
            yield (
                f"render_wgrad {dt} pool={tuple(window.values())}",
                render_wgrad_kernel._wgrad_kernel,
                wg_types,
                dict(KH=3, KW=3, STRIDE=1, **window, HAS_SCALE=True, TF32=tf32, UPCAST=False),
            )
        ep_types = dict(
            z_ptr=p,
            scale_ptr=p,
            shift_ptr=p,
            y_ptr=p,
            sw_ptr="*u8",
            P=i,
            C=i,
            Hp=i,
            Wp=i,
            Hc=i,
            Wc=i,
            slope="fp32",
            szn=i,
            szc=i,
            szh=i,
            szw=i,
        )
        for window in windows:
            label = f"bn_pool {dt} pool={tuple(window.values())}"
            yield label, conv_bn_relu_pool_kernel._bn_pool_kernel, ep_types, dict(**window, LEAKY=True)


def compile_all(all_configs: bool, arch: int = 90) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    failures = 0
    for label, kernel, types, consts in _variants():
        jit = kernel.fn  # the JITFunction under the Autotuner
        for cfg in kernel.configs if all_configs else kernel.configs[:1]:
            c = dict(consts, **cfg.kwargs)
            sig = {name: ("constexpr" if name in c else types[name]) for name in jit.arg_names}
            src = ASTSource(fn=jit, signature=sig, constexprs={(jit.arg_names.index(k),): v for k, v in c.items()})
            t0 = time.time()
            try:
                k = triton.compile(
                    src, target=target, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                )
                smem = k.metadata.shared
                note = "" if smem <= H100_SMEM else "  (exceeds sm_90 shared memory: autotune will skip it)"
                print(
                    f"ok   {label:36s} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}: shared {smem} B, "
                    f"{time.time() - t0:.1f} s{note}"
                )
            except Exception as exc:  # noqa: BLE001
                failures += 1
                print(f"FAIL {label} {cfg.kwargs}: {type(exc).__name__}: {str(exc)[:1500]}")
    return failures


def main(argv=None) -> int:
    from ._status import is_interpreting

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="every autotune config, not only the first")
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    if is_interpreting():
        print("unset TRITON_INTERPRET: the interpreter cannot compile kernels", file=sys.stderr)
        return 2
    if args.all:
        os.environ["DRMM_TRITON_AUTOTUNE"] = "1"  # read when the kernel modules are imported, below
    return 1 if compile_all(args.all, args.arch) else 0


if __name__ == "__main__":
    sys.exit(main())
