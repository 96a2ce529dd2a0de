"""CPU benchmark of fused blocks with overlapping / padded max-pools (docs/ops.md#pooling) against eager PyTorch.

Blocks (random weights, float32, ``torch.set_num_threads(2)`` by default):

- ``resnet-stem``: ResNet's stem, 3->64 7x7 stride-2 conv (padding 3) + training-mode BatchNorm + ReLU +
  ``MaxPool2d(3, 2, padding=1)``, batch 32 at 224 px (``conv_bn_relu_pool``);
- ``alexnet-1``: AlexNet's first block, 3->64 11x11 stride-4 conv (padding 2, bias) + ReLU + ``MaxPool2d(3, 2)``,
  batch 32 at 224 px (``conv_relu_pool``);
- ``conv_small`` L1 and L3 (non-overlapping 2x2 pools, batch 256): the layers the fused ops were built for, to show
  they are no slower than before.

Per block: forward + backward (gradients for x and every parameter) and render (the top-down pass from the
forward's switches; eager: ``max_pool2d``'s backward at its indices after the activation mask, then
``conv_transpose2d``), fused (``cpu`` backend) against eager, paired and alternated (bench/timing.py): the ratio is
the median of per-round eager / fused times (above 1: fused faster).

    .venv/bin/python bench/pool_windows.py [--batch 32] [--threads 2] [--repeats 9] [--warmup 2]
                                           [--blocks resnet-stem,alexnet-1,L1,L3] [--out pool_windows]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List

import torch

import drmm_kernels as dk
from drmm_kernels import testing as eager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import paired  # noqa: E402

#: The issue's targets: forward + backward and render of the overlapping-pool blocks; the old layers no slower.
TARGETS = {"fwd_bwd": 1.3, "render": 1.5, "old": 1.0}


@dataclass(frozen=True)
class Block:
    name: str
    cin: int
    cout: int
    k: int
    stride: int
    padding: int
    size: int
    batch: int
    bn: bool
    pool: int
    pool_stride: int
    pool_padding: int
    ceil_mode: bool = False

    @property
    def window(self) -> dict:
        return dict(
            pool=self.pool, pool_stride=self.pool_stride, pool_padding=self.pool_padding, ceil_mode=self.ceil_mode
        )

    @property
    def overlapping(self) -> bool:
        return self.pool_stride < self.pool


BLOCKS = {
    "resnet-stem": Block("resnet-stem", 3, 64, 7, 2, 3, 224, 32, True, 3, 2, 1),
    "alexnet-1": Block("alexnet-1", 3, 64, 11, 4, 2, 224, 32, False, 3, 2, 0),
    "L1": Block("L1", 1, 32, 5, 1, 4, 28, 256, False, 2, 2, 0),
    "L3": Block("L3", 64, 64, 3, 1, 2, 14, 256, False, 2, 2, 0),
}


def bench_block(b: Block, batch: int, warmup: int, repeats: int) -> Dict[str, object]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, b.cin, b.size, b.size, generator=g)
    w = torch.randn(b.cout, b.cin, b.k, b.k, generator=g) * (2.0 / (b.cin * b.k * b.k)) ** 0.5
    bias = torch.randn(b.cout, generator=g) * 0.1
    gamma, beta = torch.rand(b.cout, generator=g) + 0.5, torch.randn(b.cout, generator=g) * 0.1
    params = [w, gamma, beta] if b.bn else [w, bias]
    xg = x.clone().requires_grad_()
    pg = [p.clone().requires_grad_() for p in params]

    def eager_fwd(xx, ps):
        if b.bn:
            return eager.conv_bn_relu_pool(
                xx, ps[0], ps[1], ps[2], None, None, True, stride=b.stride, padding=b.padding, **b.window
            )[0]
        return eager.conv_relu_pool(xx, ps[0], stride=b.stride, padding=b.padding, bias=ps[1], **b.window)[0]

    def fused_fwd(xx, ps):
        with dk.backend("cpu"):
            if b.bn:
                return dk.conv_bn_relu_pool(
                    xx, ps[0], ps[1], ps[2], None, None, training=True, stride=b.stride, padding=b.padding, **b.window
                )[0]
            return dk.conv_relu_pool(xx, ps[0], None, ps[1], stride=b.stride, padding=b.padding, **b.window)[0]

    with torch.no_grad():
        ye, yf = eager_fwd(x, params), fused_fwd(x, params)
    torch.testing.assert_close(yf, ye, rtol=1e-4, atol=1e-4)  # the numbers mean nothing unless both agree
    gy = torch.randn(ye.shape, generator=g)

    def step(fwd):
        def go():
            for t in (xg, *pg):
                t.grad = None
            fwd(xg, pg).backward(gy)

        return go

    res: Dict[str, object] = {"block": b.name, **asdict(b), "batch": batch}
    res["fwd_bwd_eager"], res["fwd_bwd_fused"], res["fwd_bwd_x"] = paired(
        step(eager_fwd), step(fused_fwd), warmup, repeats
    )

    # render: the top-down pass through the conv weight from the switches (scale-free, as the DRMM renders)
    with torch.no_grad():
        shift = None if b.bn else bias
        pooled, idx = eager.conv_relu_pool(x, w, stride=b.stride, padding=b.padding, bias=shift, **b.window)
        with dk.backend("cpu"):
            _, sw = dk.conv_relu_pool(x, w, None, shift, stride=b.stride, padding=b.padding, **b.window)
    mu = torch.randn(pooled.shape, generator=g)
    mask = (pooled > 0).to(mu.dtype)

    def eager_render():
        return eager.render(mu, idx, w, (b.size, b.size), mask, None, b.stride, b.padding, **b.window)

    def fused_render():
        with dk.backend("cpu"):
            return dk.render(mu, sw, w, stride=b.stride, padding=b.padding, out_size=(b.size, b.size), **b.window)

    with torch.no_grad():
        torch.testing.assert_close(fused_render(), eager_render(), rtol=1e-3, atol=1e-3)
        res["render_eager"], res["render_fused"], res["render_x"] = paired(eager_render, fused_render, warmup, repeats)
    return res


def _row(r: Dict[str, object]) -> str:
    b = BLOCKS[r["block"]]
    pool = f"{b.pool}/{b.pool_stride}/{b.pool_padding}" + (" ceil" if b.ceil_mode else "")
    what = (
        f"{b.cin}→{b.cout} {b.k}×{b.k} s{b.stride}{' +BN' if b.bn else ''}, {b.size}², pool {pool}, batch {r['batch']}"
    )
    cells = [f"{r['block']}", what]
    for key in ("fwd_bwd", "render"):
        e, f, x = r[f"{key}_eager"], r[f"{key}_fused"], r[f"{key}_x"]
        target = TARGETS[key] if b.overlapping else TARGETS["old"]
        mark = "**" if x["median"] >= target else ""
        cells += [
            f"{e['median_ms']:.1f} / {f['median_ms']:.1f}",
            f"{mark}{x['median']:.2f}×{mark} ({x['q1']:.2f}-{x['q3']:.2f}), ≥ {target}",
        ]
    return "| " + " | ".join(cells) + " |"


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=None, help="batch of every block (default: the block's own)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--blocks", default=",".join(BLOCKS), help=f"comma-separated, from {', '.join(BLOCKS)}")
    ap.add_argument("--out", default="pool_windows", help="results file stem in --results (empty: write nothing)")
    ap.add_argument("--results", default=RESULTS)
    args = ap.parse_args(argv)
    names = [n for n in args.blocks.split(",") if n]
    unknown = [n for n in names if n not in BLOCKS]
    if unknown:
        ap.error(f"--blocks: unknown {unknown}; choose from {list(BLOCKS)}")
    torch.set_num_threads(args.threads)
    rows = [bench_block(BLOCKS[n], args.batch or BLOCKS[n].batch, args.warmup, args.repeats) for n in names]
    header = (
        "| block | shape | fwd+bwd eager / fused ms | fwd+bwd × (quartiles), target | render eager / fused ms | "
        "render × (quartiles), target |\n|---|---|---|---|---|---|"
    )
    table = "\n".join([header] + [_row(r) for r in rows])
    print(table)
    if args.out:
        os.makedirs(args.results, exist_ok=True)
        meta = {
            "threads": args.threads,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
        }
        with open(os.path.join(args.results, f"{args.out}.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.results, f"{args.out}.md"), "w") as f:
            f.write(f"`bench/pool_windows.py` ({args.threads} threads, {args.repeats} pairs):\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
