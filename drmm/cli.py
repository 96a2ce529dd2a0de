"""The ``drmm`` command: ``train``, ``eval`` and ``render``.

    drmm train --config configs/demo.yaml [--set key=value ...] [--resume] [--run-dir DIR] [--data-dir DIR]
    drmm eval RUN_DIR [--checkpoint best|last]
    drmm render RUN_DIR [--num 8] [--checkpoint best|last]
    drmm sample RUN_DIR [--class c] [--num N]                    (drmm/sample.py)
    drmm experiment {table1,report,convergence,throughput} ...   (drmm/experiments.py)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
import yaml


def _load_run(run_dir: Path, checkpoint: str, data_dir: Optional[str], device: str):
    from . import train as T
    from .priors import load_model_state

    run_dir = Path(run_dir)
    cfg_path, ckpt_path = run_dir / "config.yaml", run_dir / f"{checkpoint}.pt"
    for p in (cfg_path, ckpt_path):
        if not p.exists():
            raise SystemExit(f"error: {p} not found; is {run_dir} a drmm run directory (made by `drmm train`)?")
    with open(cfg_path) as f:
        cfg = T.config_from_dict(yaml.safe_load(f))
    if data_dir is not None:
        cfg.data_dir = data_dir
    dev = T.resolve_device(device if device != "config" else cfg.device)
    data = T.load_data(cfg, dev)
    model = T.model_from_config(cfg, data.image_shape, data.num_classes).to(dev)
    ckpt = torch.load(ckpt_path, map_location=dev, weights_only=False)
    load_model_state(model, ckpt["model"])   # tolerates checkpoints from before the switch priors
    model.eval()
    return cfg, data, model, ckpt


def cmd_train(args) -> int:
    from . import train as T

    if not Path(args.config).is_file():
        raise SystemExit(f"error: config file {args.config} not found (see configs/ for examples)")
    if args.resume and not args.run_dir:
        raise SystemExit("error: --resume needs --run-dir (the run to continue)")
    cfg = T.load_config(args.config, args.set or [])
    if args.data_dir is not None:
        cfg.data_dir = args.data_dir
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        run_dir = Path("runs") / f"{cfg.name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"[drmm] run dir: {run_dir}  (model {cfg.model}, trainer {cfg.trainer}, mode {cfg.mode}, "
          f"dataset {cfg.dataset}, N_L={cfg.num_labeled or 'all'})", flush=True)
    summary = T.train(cfg, run_dir, resume=args.resume)
    if summary["best_on"] == "validation":
        best = (f"best.pt: validation error {summary['best_error']:.2f} %, test error there "
                f"{summary['test_error_at_best']:.2f} %")
    else:
        best = f"best {summary['best_error']:.2f} %, best-on-test"
    print(f"[drmm] final test error: {summary['test_error']:.2f} % on {summary['eval_images']} test images "
          f"({best}) after {summary['steps']} steps, {summary['train_seconds']:.0f} s", flush=True)
    return 0


def cmd_eval(args) -> int:
    from . import train as T

    cfg, data, model, ckpt = _load_run(Path(args.run_dir), args.checkpoint, args.data_dir, args.device)
    err = T.evaluate(model, data, 0, cfg.eval_batch_size)
    print(f"[drmm] {args.run_dir} ({args.checkpoint}.pt, step {ckpt['step']}): test error {err:.2f} % "
          f"on {len(data.test_labels)} test images")
    from .metrics import clustering_report, predict_test   # the predicted class read as a cluster id
    report = clustering_report(data.test_labels.cpu().numpy(), predict_test(model, data, cfg.eval_batch_size))
    print(f"[drmm] clustering: accuracy {100 * report['cluster_acc']:.2f} % (Hungarian-matched), "
          f"NMI {report['nmi']:.4f}, ARI {report['ari']:.4f}")
    return 0


def cmd_render(args) -> int:
    from .render import save_level_grid, save_reconstruction_grid

    cfg, data, model, _ = _load_run(Path(args.run_dir), args.checkpoint, args.data_dir, args.device)
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

    from .experiments import add_experiment_parser  # `drmm experiment ...`: the paper's MNIST rows
    add_experiment_parser(sub)
    from .sample import add_sample_parser  # `drmm sample RUN_DIR --class c`: draws from the switch priors
    add_sample_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from .data import DataNotFoundError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataNotFoundError, FileExistsError, FileNotFoundError) as e:  # user errors: a message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
