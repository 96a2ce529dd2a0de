"""The ``drmm`` command: ``train``, ``eval``, ``render`` (PNG grids of what a trained run renders) and ``sample``.

    drmm train --config configs/demo.yaml [--set key=value ...] [--resume] [--run-dir DIR] [--data-dir DIR]
    drmm eval RUN_DIR [--checkpoint best|last]
    drmm render RUN_DIR [--num 8] [--checkpoint best|last]
    drmm sample RUN_DIR [--class c] [--num N]                    (the sampler: drmm/sample.py)
    drmm experiment {table1,report,convergence,throughput} ...   (its parser: drmm/experiments.py)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
import yaml

from .config import config_from_dict, load_config, resolve_device
from .data import DataNotFoundError
from .experiments import add_experiment_parser
from .figures import save_image_grid, save_level_grid, save_reconstruction_grid
from .metrics import clustering_report, predict_test
from .plan import load_data
from .priors import load_model_state
from .run_dir import CONFIG
from .sample import class_appearance, sample_images
from .train import evaluate, model_from_config, train


def load_run(run_dir: Path, checkpoint: str, data_dir: Optional[str], device: str):
    """(config, data, model in eval mode, checkpoint) of a run folder made by ``drmm train``."""
    run_dir = Path(run_dir)
    cfg_path, ckpt_path = run_dir / CONFIG, run_dir / f"{checkpoint}.pt"
    for p in (cfg_path, ckpt_path):
        if not p.exists():
            raise SystemExit(f"error: {p} not found; is {run_dir} a drmm run directory (made by `drmm train`)?")
    with open(cfg_path) as f:
        cfg = config_from_dict(yaml.safe_load(f))
    if data_dir is not None:
        cfg.data_dir = data_dir
    dev = resolve_device(device if device != "config" else cfg.device)
    data = load_data(cfg, dev)
    model = model_from_config(cfg, data.image_shape, data.num_classes).to(dev)
    ckpt = torch.load(ckpt_path, map_location=dev, weights_only=False)
    load_model_state(model, ckpt["model"])   # tolerates checkpoints from before the switch priors
    model.eval()
    return cfg, data, model, ckpt


def cmd_train(args) -> int:
    if not Path(args.config).is_file():
        raise SystemExit(f"error: config file {args.config} not found (see configs/ for examples)")
    if args.resume and not args.run_dir:
        raise SystemExit("error: --resume needs --run-dir (the run to continue)")
    cfg = load_config(args.config, args.set or [])
    if args.data_dir is not None:
        cfg.data_dir = args.data_dir
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        run_dir = Path("runs") / f"{cfg.name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"[drmm] run dir: {run_dir}  (model {cfg.model}, trainer {cfg.trainer}, mode {cfg.mode}, "
          f"dataset {cfg.dataset}, N_L={cfg.num_labeled or 'all'})", flush=True)
    summary = train(cfg, run_dir, resume=args.resume)
    if summary["best_on"] == "validation":
        best = (f"best.pt: validation error {summary['best_error']:.2f} %, test error there "
                f"{summary['test_error_at_best']:.2f} %")
    else:
        best = f"best {summary['best_error']:.2f} %, best-on-test"
    print(f"[drmm] final test error: {summary['test_error']:.2f} % on {summary['eval_images']} test images "
          f"({best}) after {summary['steps']} steps, {summary['train_seconds']:.0f} s", flush=True)
    return 0


def cmd_eval(args) -> int:
    cfg, data, model, ckpt = load_run(Path(args.run_dir), args.checkpoint, args.data_dir, args.device)
    err = evaluate(model, data, 0, cfg.eval_batch_size)
    print(f"[drmm] {args.run_dir} ({args.checkpoint}.pt, step {ckpt['step']}): test error {err:.2f} % "
          f"on {len(data.test_labels)} test images")
    # the predicted class read as a cluster id
    report = clustering_report(data.test_labels.cpu().numpy(), predict_test(model, data, cfg.eval_batch_size))
    print(f"[drmm] clustering: accuracy {100 * report['cluster_acc']:.2f} % (Hungarian-matched), "
          f"NMI {report['nmi']:.4f}, ARI {report['ari']:.4f}")
    return 0


def cmd_render(args) -> int:
    cfg, data, model, _ = load_run(Path(args.run_dir), args.checkpoint, args.data_dir, args.device)
    out_dir = Path(args.out_dir or args.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = data.test_images[:args.num]
    x = data.normalize(images)
    with torch.no_grad():
        logits, latents = model(x)
        classes = logits.argmax(1) if args.classes == "predicted" else data.test_labels[:args.num]
        x_hat, levels = model.render(latents, classes, return_levels=True)
    p1 = save_reconstruction_grid(x, x_hat, out_dir / "reconstructions.png", data)
    p2 = save_level_grid(levels, out_dir / "rendered_levels.png")
    print(f"[drmm] wrote {p1} (input / reconstruction pairs) and {p2} (rendered template per level)")
    return 0


def cmd_sample(args) -> int:
    """Images drawn top-down from the switch priors, and the class appearance models (drmm/sample.py)."""
    cfg, data, model, ckpt = load_run(Path(args.run_dir), args.checkpoint, args.data_dir, args.device)
    if args.num < 1:
        raise SystemExit(f"error: --num must be >= 1, got {args.num}")
    if args.class_ is not None and not 0 <= args.class_ < model.num_classes:
        raise SystemExit(f"error: --class must be in 0..{model.num_classes - 1}, got {args.class_}")
    out_dir = Path(args.out_dir or args.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    dev = model.readout.weight.device
    if args.class_ is None:   # a class per sample, uniform (the readout bias is a relaxed, not a fitted, prior)
        classes = torch.randint(0, model.num_classes, (args.num,), generator=g).to(dev)
        name = "samples.png"
    else:
        classes = torch.full((args.num,), args.class_, dtype=torch.long, device=dev)
        name = f"samples_class{args.class_}.png"
    images = sample_images(model, classes, g)
    p1 = save_image_grid(images, out_dir / name, [f"c={int(c)}" for c in classes])
    p2 = save_image_grid(class_appearance(model), out_dir / "class_appearance.png",
                         [f"class {c}" for c in range(model.num_classes)], ncols=model.num_classes)
    print(f"[drmm] wrote {p1} ({args.num} samples from the switch priors) and {p2} (class appearance models)")
    return 0


def add_sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="draw images top-down from the switch priors; class appearance models")
    p.add_argument("run_dir")
    p.add_argument("--class", dest="class_", type=int, default=None, help="class to sample (default: uniform)")
    p.add_argument("--num", type=int, default=16, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", choices=("best", "last"), default="last")
    p.add_argument("--data-dir")
    p.add_argument("--device", default="config", help="device (default: the run's config)")
    p.add_argument("--out-dir", help="where the PNGs go (default: the run dir)")
    p.set_defaults(func=cmd_sample)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drmm", description="Deep Rendering Mixture Model: train, eval, render")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last.pt")
    p.add_argument("--run-dir", help="run directory (default runs/<name>-<time>)")
    p.add_argument("--data-dir", help="data root (default: config data_dir, $DRMM_DATA_DIR, ./data)")
    p.set_defaults(func=cmd_train)

    for name, func, helptext in (("eval", cmd_eval, "test error of a trained run"),
                                 ("render", cmd_render, "PNG grids: reconstructions and per-level templates")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run_dir")
        p.add_argument("--checkpoint", choices=("best", "last"), default="best" if name == "eval" else "last")
        p.add_argument("--data-dir")
        p.add_argument("--device", default="config", help="device (default: the run's config)")
        if name == "render":
            p.add_argument("--num", type=int, default=8, help="number of test images")
            p.add_argument("--classes", choices=("predicted", "true"), default="predicted",
                           help="render the predicted class's template or the true label's")
            p.add_argument("--out-dir", help="where the PNGs go (default: the run dir)")
        p.set_defaults(func=func)

    add_experiment_parser(sub)  # `drmm experiment ...`: the paper's MNIST rows (experiments.py)
    add_sample_parser(sub)      # `drmm sample RUN_DIR --class c`: draws from the switch priors
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataNotFoundError, FileExistsError, FileNotFoundError) as e:  # user errors: a message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
