"""Does fusing pay on real models? ``drmm_kernels.fuse(model)`` against the unfused torchvision model, CPU, in the
same run: inference, a training step, and top-down attribution against Captum.

Cases (``--cases``, comma-separated; default all three):

- ``inference``: vgg16_bn, ``model.eval()``, ``torch.no_grad()``, batch 8 at 64 px: ``model(x)`` vs
  ``dk.fuse(model)(x)``. Check: the largest difference of the logits, relative to the largest logit.
- ``train``: vgg16_bn, ``model.train()``, batch 8 at 64 px, one step = ``zero_grad(set_to_none=True)``, forward,
  cross-entropy, backward (no optimizer step), unfused vs ``dk.fuse(copy.deepcopy(model))`` (same weights, own
  gradients and BN statistics). Check: the largest relative difference of the loss and of any parameter's gradient
  (Frobenius norm, floored at 1e-3 of the largest gradient's), one step from the same RNG state (dropout masks
  alike).
- ``attr``: vgg11 and vgg16_bn, ``model.eval()``, parameters left trainable (``requires_grad=True``, as a user's
  model has them; ``--frozen`` freezes them), the three modes Saliency (``"gradient"``, signed), GuidedBackprop
  (``"guided"``) and Deconvolution (``"deconvnet"``), at batch 4 / 64 px and batch 1 / 224 px. The baseline is
  Captum's own call on the unfused model (``GuidedBackprop(model).attribute(x, target=t)``); the fused side is
  ``with drmm_kernels.attribution(mode):`` on ``dk.fuse(model)``, asking for the input gradient in two ways:
  ``backward()``, the README's pattern (``out[range(n), t].sum().backward()``, then ``x.grad``; the parameters'
  gradients are computed and reset each run), and ``autograd.grad`` (``torch.autograd.grad(score, x)``). Captum
  and the two fused ways alternate in the same rounds. Check: the largest difference of the fused map from
  Captum's, relative to Captum's largest value (a near-tie in a pooling window can route a whole window
  elsewhere, which would show here).

Timing (bench/timing.py): after ``--warmup`` untimed rounds, ``--repeats`` rounds, each calling every side once,
the order reversed every other round (ABBA); times are medians, and ``unfused / fused`` is the median of the
per-round ratios (> 1: fused faster), with its quartiles, a paired measure that load drifting between rounds
cancels out of. Random weights (torchvision's initialisation, seed 0); the classifier is shrunk to
512*7*7 -> 64 -> 64 -> 10 (same layer types) unless ``--full-head``, because its 25088x4096 matrix would weigh the
same on both sides (as bench/attribution.py).
Targets (the issue's): attribution >= 1.5x, vgg16_bn training step >= 1.3x, inference >= 1.25x.

Prints one markdown table; with ``--out [STEM]`` also writes ``STEM.md`` and ``STEM.json`` (default stem
bench/results/dropin). ``--quick``: tiny sizes, no warm-up, one round (a test that the script works, in seconds;
not a measurement).

    .venv/bin/python bench/dropin.py [--cases inference,train,attr] [--attr-models vgg11,vgg16_bn]
                                     [--modes gradient,guided,deconvnet] [--repeats 9] [--warmup 2] [--threads 2]
                                     [--full-head] [--frozen] [--quick] [--out [bench/results/dropin]]
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
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "dropin")
if os.path.join(ROOT, "bench") not in sys.path:  # tests run this file by path (runpy)
    sys.path.insert(0, os.path.join(ROOT, "bench"))
from timing import alternated, pair_ratios  # noqa: E402

CASES = ("inference", "train", "attr")
MODES = ("gradient", "guided", "deconvnet")
CAPTUM_NAME = {"gradient": "Saliency", "guided": "GuidedBackprop", "deconvnet": "Deconvolution"}
WAYS = ("backward()", "autograd.grad")
TARGETS = {"inference": 1.25, "train": 1.3, "attr": 1.5}
ATTR_MODELS = ("vgg11", "vgg16_bn")
TARGET_CLASS = 3

# (batch, pixels) of each case: the sizes, and --quick's tiny ones.
SIZES = {
    "full": {"inference": (8, 64), "train": (8, 64), "attr": ((4, 64), (1, 224))},
    "quick": {"inference": (2, 32), "train": (2, 32), "attr": ((1, 32),)},
}


def build_model(name: str, full_head: bool = False) -> nn.Module:
    """A torchvision VGG (``vgg11``, ``vgg16_bn``, ...) with torchvision's random initialisation (seed 0), the
    classifier shrunk to 512*7*7 -> 64 -> 64 -> 10 unless ``full_head``; built on the meta device, then
    initialised, so the full head's weights are never initialised twice.

    torchvision's initialisation, not each layer's ``reset_parameters`` (bench/attribution.py's): with the latter,
    the conv biases dominate vgg16_bn's deep activations, whose pooling windows then hold near-ties (hundreds
    within 1e-5 at 224 px) that float32 rounding decides, so eager and the fused ops (BN folded into the conv in
    eval mode) route some windows differently and the maps differ by ~1e-2; they agree exactly in float64.
    """
    import torchvision

    with torch.device("meta"):
        model = getattr(torchvision.models, name)()
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
    for m in model.modules():  # as torchvision.models.VGG.__init__
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            m.reset_running_stats()
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


def fused_copy(model: nn.Module) -> nn.Module:
    """``dk.fuse`` of a deep copy: the same weights, but its own parameters, gradients and BN statistics."""
    import drmm_kernels as dk

    fused = dk.fuse(copy.deepcopy(model))
    return fused.train(model.training)


def rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def norm_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius difference (a gradient that one near-tie moves is still close in norm)."""
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _inputs(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ runners


def inference_runner(net: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run():
        with torch.no_grad():
            return net(x)

    return run


def train_runner(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run():
        net.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss.detach()

    return run


def captum_runner(model: nn.Module, mode: str, x: torch.Tensor, target: int) -> Callable[[], torch.Tensor]:
    """Captum's own call on the unfused model (its hooks on the ``nn.ReLU`` modules)."""
    from captum.attr import Deconvolution, GuidedBackprop, Saliency

    method = {"gradient": Saliency, "guided": GuidedBackprop, "deconvnet": Deconvolution}[mode](model)
    kwargs = {"abs": False} if mode == "gradient" else {}

    def run():
        return method.attribute(x.clone().requires_grad_(), target=target, **kwargs)

    return run


def fused_attribution_runner(
    fused: nn.Module, mode: str, x: torch.Tensor, target: int, way: str
) -> Callable[[], torch.Tensor]:
    """``with drmm_kernels.attribution(mode):`` on the fused model; the input gradient by ``backward()`` (the
    README's pattern: parameters' gradients computed too, reset each run) or by ``torch.autograd.grad``."""
    import drmm_kernels as dk

    n = x.shape[0]
    if way == "backward()":

        def run():
            fused.zero_grad(set_to_none=True)
            xg = x.clone().requires_grad_()
            with dk.attribution(mode):
                out = fused(xg)
                out[range(n), target].sum().backward()
            return xg.grad

    elif way == "autograd.grad":

        def run():
            xg = x.clone().requires_grad_()
            with dk.attribution(mode):
                score = fused(xg)[range(n), target].sum()
                return torch.autograd.grad(score, xg)[0]

    else:
        raise ValueError(f"way must be one of {WAYS}, got {way!r}")
    return run


# -------------------------------------------------------------------------------------------------- cases


def _row(kind, name, batch, size, unfused, fused, check, **extra) -> Dict:
    ratio = pair_ratios(unfused, fused)
    return {
        "kind": kind,
        "case": name,
        "batch": batch,
        "size": size,
        "unfused_ms": statistics.median(unfused),
        "fused_ms": statistics.median(fused),
        "ratio": ratio["median"],
        "ratio_q1": ratio["q1"],
        "ratio_q3": ratio["q3"],
        "target": TARGETS[kind],
        "check": check,
        **extra,
    }


class Models:
    """The unfused / fused pairs, built once per model and mode (fx-tracing vgg16_bn takes seconds)."""

    def __init__(self, full_head: bool, frozen: bool) -> None:
        self.full_head, self.frozen, self.pairs = full_head, frozen, {}

    def pair(self, name: str, training: bool) -> Tuple[nn.Module, nn.Module]:
        key = (name, training)
        if key not in self.pairs:
            model = build_model(name, self.full_head).train(training)
            if self.frozen and not training:
                model.requires_grad_(False)
            self.pairs[key] = (model, fused_copy(model))
        return self.pairs[key]


def run_inference(models: Models, batch: int, size: int, warmup: int, repeats: int) -> List[Dict]:
    model, fused = models.pair("vgg16_bn", training=False)
    x = _inputs(batch, size)
    fns = {"unfused": inference_runner(model, x), "fused": inference_runner(fused, x)}
    check = rel_diff(fns["fused"](), fns["unfused"]())
    times, _ = alternated(fns, warmup, repeats)
    name = f"vgg16_bn inference, batch {batch}, {size} px"
    return [_row("inference", name, batch, size, times["unfused"], times["fused"], check, model="vgg16_bn")]


def run_train(models: Models, batch: int, size: int, warmup: int, repeats: int) -> List[Dict]:
    model, fused = models.pair("vgg16_bn", training=True)
    x = _inputs(batch, size)
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(2))
    fns = {"unfused": train_runner(model, x, y), "fused": train_runner(fused, x, y)}
    torch.manual_seed(3)
    loss_ref = fns["unfused"]()
    torch.manual_seed(3)
    loss = fns["fused"]()
    fused_params = dict(fused.named_parameters())
    grads = []
    for pname, p in model.named_parameters():
        q = fused_params[pname]
        assert (p.grad is None) == (q.grad is None), f"train step: gradient of {pname} on one side only"
        if p.grad is not None:
            grads.append((q.grad, p.grad))
    # Each gradient's difference relative to its own norm, floored at 1e-3 of the largest one's: a conv bias
    # before a training-mode BN has an exact gradient of 0, which the fused op gives and eager rounds to ~1e-7.
    floor = 1e-3 * max(ref.norm().item() for _, ref in grads)
    diffs = [norm_diff(loss, loss_ref)]
    diffs += [((got - ref).norm() / max(ref.norm().item(), floor)).item() for got, ref in grads]
    times, _ = alternated(fns, warmup, repeats)
    name = f"vgg16_bn training step, batch {batch}, {size} px"
    return [_row("train", name, batch, size, times["unfused"], times["fused"], max(diffs), model="vgg16_bn")]


def run_attr(models: Models, sizes, modes, model_names, warmup: int, repeats: int) -> List[Dict]:
    rows = []
    for name in model_names:
        model, fused = models.pair(name, training=False)
        for batch, size in sizes:
            x = _inputs(batch, size)
            for mode in modes:
                fns = {"captum": captum_runner(model, mode, x, TARGET_CLASS)}
                for way in WAYS:
                    fns[way] = fused_attribution_runner(fused, mode, x, TARGET_CLASS, way)
                ref = fns["captum"]()
                checks = {way: rel_diff(fns[way](), ref) for way in WAYS}
                times, _ = alternated(fns, warmup, repeats)
                for way in WAYS:
                    case = f"{name} {mode} ({CAPTUM_NAME[mode]}), batch {batch}, {size} px, {way}"
                    rows.append(
                        _row(
                            "attr",
                            case,
                            batch,
                            size,
                            times["captum"],
                            times[way],
                            checks[way],
                            model=name,
                            mode=mode,
                            way=way,
                        )
                    )
    return rows


# ---------------------------------------------------------------------------------------------------- main


def table(rows: List[Dict], header: str) -> str:
    lines = [
        header,
        "",
        "| case | unfused ms | fused ms | unfused / fused (q1-q3) | target | met | check (max rel diff) |",
        "|---|---:|---:|---:|---:|:---:|---:|",
    ]
    for r in rows:
        met = "yes" if r["ratio"] >= r["target"] else "no"
        lines.append(
            f"| {r['case']} | {r['unfused_ms']:.1f} | {r['fused_ms']:.1f} | **{r['ratio']:.2f}x** "
            f"({r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}) | >= {r['target']:.2f}x | {met} | {r['check']:.1e} |"
        )
    return "\n".join(lines)


def _parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--attr-models", default=",".join(ATTR_MODELS), help="models of the attr case")
    ap.add_argument("--modes", default=",".join(MODES), help="attribution modes of the attr case")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 9; 1 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; 0 with --quick)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--full-head", action="store_true", help="torchvision's 25088x4096 classifier")
    ap.add_argument("--frozen", action="store_true", help="attr: parameters requires_grad=False")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round: checks that the script works")
    ap.add_argument(
        "--out",
        nargs="?",
        const=DEFAULT_OUT,
        default=None,
        metavar="STEM",
        help=f"write STEM.md and STEM.json (default stem {os.path.relpath(DEFAULT_OUT, ROOT)})",
    )
    args = ap.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    args.attr_models = [c.strip() for c in args.attr_models.split(",") if c.strip()]
    args.modes = [c.strip() for c in args.modes.split(",") if c.strip()]
    for what, chosen, known in (("--cases", args.cases, CASES), ("--modes", args.modes, MODES)):
        unknown = [c for c in chosen if c not in known]
        if unknown:
            ap.error(f"{what}: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 9
    if args.warmup is None:
        args.warmup = 0 if args.quick else 2
    return args


def main(argv=None) -> int:
    args = _parse(argv)

    import captum
    import drmm_kernels as dk

    warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU activations")
    torch.set_num_threads(args.threads)
    sizes = SIZES["quick" if args.quick else "full"]
    models = Models(args.full_head, args.frozen)
    rows: List[Dict] = []
    if "inference" in args.cases:
        rows += run_inference(models, *sizes["inference"], args.warmup, args.repeats)
    if "train" in args.cases:
        rows += run_train(models, *sizes["train"], args.warmup, args.repeats)
    if "attr" in args.cases:
        rows += run_attr(models, sizes["attr"], args.modes, args.attr_models, args.warmup, args.repeats)

    head = "full" if args.full_head else "small"
    params = "frozen" if args.frozen else "trainable"
    header = (
        f"{'QUICK (tiny sizes, not a measurement): ' if args.quick else ''}"
        f"torchvision VGGs (random weights, {head} head), float32, {args.threads} threads, median of "
        f"{args.repeats} alternated rounds after {args.warmup} warm-up; unfused = the torchvision model (for attr: "
        f"Captum on it), fused = drmm_kernels.fuse of a copy; attr parameters {params}; torch {torch.__version__}, "
        f"captum {captum.__version__}, drmm_kernels backend {dk.get_backend()} "
        f"({dk.dispatch.resolve(torch.device('cpu'))}), {platform.processor() or platform.machine()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    text = table(rows, header)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        command = " ".join(argv if argv is not None else sys.argv[1:])
        with open(f"{args.out}.md", "w") as f:
            f.write(
                f"# Drop-in on real models: fused vs unfused, CPU\n\n"
                f"Command: `.venv/bin/python bench/dropin.py {command}`\n\n{text}\n"
            )
        with open(f"{args.out}.json", "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "torch": torch.__version__,
                    "captum": captum.__version__,
                    "threads": torch.get_num_threads(),
                    "rows": rows,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
