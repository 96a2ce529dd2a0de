"""CPU timing of top-down attribution: ``drmm_kernels.attribution`` on the fused torchvision VGG11 against Captum
(``Saliency``, ``GuidedBackprop``, ``Deconvolution``) on the unfused model, in the same run.

Per mode, three ways of computing the same input map (one forward and one backward to the input each):

- ``captum``: Captum's attribution object on the unfused model (its hooks on the ``nn.ReLU`` modules);
- ``hooks``: ``with drmm_kernels.attribution(mode)`` on the same unfused model (the context's module hooks);
- ``fused``: ``with drmm_kernels.attribution(mode)`` on ``drmm_kernels.fuse(model)`` (the modes applied in the
  fused ops' backward, on the default CPU backend).

The three alternate within each repeat, the order reversed every other round (bench/timing.py), so a change of
machine load affects all alike; times are medians over ``--repeats`` after ``--warmup`` rounds; ``Captum / fused``
is the median of the per-round ratios (a paired measure, robust to load that drifts between rounds). ``max rel
diff`` is the largest difference of the fused map from Captum's, relative to Captum's largest value (float32; a
near-tie in a pooling window can route a whole window elsewhere, which would show here). Random weights, frozen (no
weight gradients on any side), eval mode; the classifier is shrunk to 512*7*7 -> 64 -> 64 -> 10 (same layer types)
unless ``--full-head``, because its 25088x4096 matrix would dominate both sides alike.

Prints a markdown table and writes ``<results>/<out>.md`` and ``.json`` (``--results``, default bench/results;
``--out``, default ``attribution``).

    .venv/bin/python bench/attribution.py [--batch 2] [--size 32] [--threads 2] [--repeats 5] [--warmup 1]
                                          [--full-head] [--out attribution] [--results bench/results]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import warnings
from typing import Callable, Dict

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
if os.path.join(ROOT, "bench") not in sys.path:  # tests run this file by path (runpy)
    sys.path.insert(0, os.path.join(ROOT, "bench"))
from timing import alternated, pair_ratios  # noqa: E402

MODES = ("gradient", "guided", "deconvnet")


def build_vgg11(full_head: bool) -> nn.Module:
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.vgg11()
    if not full_head:
        model.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 64),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(64, 64),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(64, 10),
        )
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model.eval()


def runners(model: nn.Module, fused: nn.Module, mode: str, x: torch.Tensor, target: int) -> Dict[str, Callable]:
    import drmm_kernels as dk
    from captum.attr import Deconvolution, GuidedBackprop, Saliency

    captum = {"gradient": Saliency, "guided": GuidedBackprop, "deconvnet": Deconvolution}[mode](model)
    kwargs = {"abs": False} if mode == "gradient" else {}

    def run_captum():
        return captum.attribute(x.clone().requires_grad_(), target=target, **kwargs)

    def ours(net):
        def run():
            xg = x.clone().requires_grad_()
            with dk.attribution(mode):
                return torch.autograd.grad(net(xg)[:, target].sum(), xg)[0]

        return run

    return {"captum": run_captum, "hooks": ours(model), "fused": ours(fused)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--full-head", action="store_true")
    ap.add_argument("--out", default="attribution")
    ap.add_argument("--results", default=RESULTS, help="folder for <out>.md and <out>.json")
    args = ap.parse_args(argv)

    import captum
    import drmm_kernels as dk

    warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU activations")
    torch.set_num_threads(args.threads)
    # Frozen weights, as in an attribution study: no side computes weight gradients. (With trainable weights
    # Captum's autograd.grad to the input lets ATen skip them, while the fused ops' backward, a custom
    # autograd.Function, computes every input's gradient that requires one.)
    model = build_vgg11(args.full_head).requires_grad_(False)
    fused = dk.fuse(copy.deepcopy(model))
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    target = 3

    rows = []
    for mode in MODES:
        fns = runners(model, fused, mode, x, target)
        ref, got = fns["captum"](), fns["fused"]()
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        times, _ = alternated(fns, args.warmup, args.repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        # the ratio of each round's pair, then the median: robust to load that drifts between rounds
        paired = pair_ratios(times["captum"], times["fused"])["median"]
        rows.append(
            {
                "mode": mode,
                "captum_ms": med["captum"],
                "hooks_ms": med["hooks"],
                "fused_ms": med["fused"],
                "speedup": paired,
                "max_rel_diff": rel,
            }
        )

    captum_name = {"gradient": "Saliency", "guided": "GuidedBackprop", "deconvnet": "Deconvolution"}
    head = "full" if args.full_head else "small"
    lines = [
        f"VGG11 (random frozen weights, eval, {head} head), input {args.batch}x3x{args.size}x{args.size} "
        f"float32, {args.threads} threads, median of {args.repeats} (after {args.warmup} warm-up), one forward "
        f"+ backward to the input per run (torch.autograd.grad); torch {torch.__version__}, captum "
        f"{captum.__version__}, drmm_kernels backend {dk.get_backend()} ({dk.dispatch.resolve(x.device)}), "
        f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f} at the end",
        "",
        "| mode (Captum) | Captum, unfused ms | attribution(), unfused ms | attribution(), fused ms "
        "| Captum / fused | max rel diff |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} ({captum_name[r['mode']]}) | {r['captum_ms']:.1f} | {r['hooks_ms']:.1f} | "
            f"{r['fused_ms']:.1f} | {r['speedup']:.2f}x | {r['max_rel_diff']:.1e} |"
        )
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, f"{args.out}.md"), "w") as f:
        f.write(
            f"# Attribution on CPU: drmm_kernels vs Captum\n\nCommand: `.venv/bin/python bench/attribution.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{table}\n"
        )
    with open(os.path.join(args.results, f"{args.out}.json"), "w") as f:
        json.dump(
            {"args": vars(args), "torch": torch.__version__, "captum": captum.__version__, "rows": rows}, f, indent=2
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
