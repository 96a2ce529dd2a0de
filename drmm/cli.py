"""The ``drmm`` command: ``train``, ``eval``, ``render`` (PNG grids of what a trained run renders) and ``sample``.

    drmm train --config configs/demo.yaml [--set key=value ...] [--resume] [--run-dir DIR] [--data-dir DIR]
    drmm eval RUN_DIR [--checkpoint best|last]   (default: best.pt if the run has a validation split, else last.pt)
    drmm render RUN_DIR [--num 8] [--checkpoint best|last]
    drmm sample RUN_DIR [--class c] [--num N]                    (the sampler: drmm/sample.py)
    drmm experiment {table1,report,convergence,throughput} ...   (its parser: drmm/paper/cli.py)

Errors: input the user can fix (a bad config key or value, a missing or corrupt data file or checkpoint) raises
``drmm.errors.UsageError`` where it is found; ``main`` prints it as one line, ``drmm <command>: error: ...``, and
exits with status 2 (as argparse does for bad arguments). ``drmm --debug <command> ...`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from .config import config_from_dict, load_config, read_yaml_mapping, resolve_device
from .errors import UsageError
from .paper import add_experiment_parser
from .figures import save_image_grid, save_level_grid, save_reconstruction_grid
from .metrics import clustering_report, predict_test
from .plan import load_data
from .priors import load_model_state
from .run_dir import BEST, CONFIG, CheckpointError, RunDirError, load_checkpoint
from .sample import class_appearance, sample_images
from .train import evaluate, model_from_config, train


def read_run_config(run_dir: Path):
    """The TrainConfig of a run folder made by ``drmm train`` (its config.yaml)."""
    cfg_path = run_dir / CONFIG
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such folder; pass a run directory made by `drmm train` (runs/<name>-<time>)")
    if not cfg_path.is_file():
        raise RunDirError(
            f"{run_dir} is not a drmm run directory (no {CONFIG}); pass the folder `drmm train` "
            f"wrote (its --run-dir, or runs/<name>-<time>)"
        )
    return config_from_dict(read_yaml_mapping(cfg_path), str(cfg_path))


def load_run(run_dir: Path, checkpoint: str, data_dir: Optional[str], device: str):
    """(config, data, model in eval mode, checkpoint) of a run folder made by ``drmm train``."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    ckpt_path = run_dir / f"{checkpoint}.pt"
    if not ckpt_path.is_file():
        present = sorted(p.name for p in run_dir.glob("*.pt"))
        raise RunDirError(
            f"{ckpt_path} not found; the run has "
            + (
                f"only {', '.join(present)}: pass --checkpoint {present[0][:-3]}"
                if present
                else "no checkpoint yet (training writes last.pt at its "
                "first evaluation): train it first, or resume it with drmm train --resume"
            )
        )
    if data_dir is not None:
        cfg.data_dir = data_dir
    dev = resolve_device(device if device != "config" else cfg.device)
    ckpt = load_checkpoint(ckpt_path, dev)  # refuses torn and foreign files before the data is loaded
    data = load_data(cfg, dev)
    model = model_from_config(cfg, data.image_shape, data.num_classes).to(dev)
    try:
        load_model_state(model, ckpt["model"])  # tolerates checkpoints from before the switch priors
    except (RuntimeError, KeyError):
        own, saved = model.state_dict(), ckpt["model"]
        other = sum(1 for k in own.keys() & saved.keys() if tuple(own[k].shape) != tuple(saved[k].shape))
        raise CheckpointError(
            f"{ckpt_path}: its weights do not fit the model {run_dir / CONFIG} describes "
            f"(model {cfg.model}: {len(own.keys() - saved.keys())} tensors missing, "
            f"{len(saved.keys() - own.keys())} unexpected, {other} of another shape); the "
            f"checkpoint comes from another run or config"
        ) from None
    model.eval()
    return cfg, data, model, ckpt


def eval_checkpoint(run_dir: Path, asked: Optional[str]) -> str:
    """The checkpoint ``drmm eval`` scores: the one asked for; else best.pt when the run selected it on a
    validation split, last.pt otherwise (a best.pt chosen on the test set would score optimistically)."""
    if asked is not None:
        return asked
    cfg = read_run_config(run_dir)
    return "best" if cfg.val_samples > 0 and (run_dir / BEST).is_file() else "last"


def describe_checkpoint(name: str, asked: Optional[str], cfg, ckpt) -> str:
    """How the scored checkpoint was chosen, for the eval line."""
    step = ckpt.get("step", "?")
    if name == "best":
        if cfg.val_samples > 0:
            return f"lowest validation error, step {step}"
        return (
            f"lowest test error, step {step}: the run has no validation split, so best.pt was chosen on the "
            f"test set and its test error is optimistic; drop --checkpoint best, or train with val_samples > 0"
        )
    why = f"final weights, step {step}"
    if asked is None:
        why += "; the run has no validation split" if cfg.val_samples == 0 else "; the run has no best.pt"
    return why


def cmd_train(args) -> int:
    if not Path(args.config).is_file():
        raise UsageError(f"config file {args.config} not found; pass a YAML file (see configs/ for examples)")
    if args.resume and not args.run_dir:
        raise UsageError("--resume needs --run-dir (the run to continue)")
    cfg = load_config(args.config, args.set or [])
    if args.data_dir is not None:
        cfg.data_dir = args.data_dir
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        run_dir = Path("runs") / f"{cfg.name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(
        f"[drmm] run dir: {run_dir}  (model {cfg.model}, trainer {cfg.trainer}, mode {cfg.mode}, "
        f"dataset {cfg.dataset}, N_L={cfg.num_labeled or 'all'})",
        flush=True,
    )
    summary = train(cfg, run_dir, resume=args.resume)
    if summary["best_on"] == "validation":
        best = f"best.pt: validation error {summary['best_error']:.2f} %; the test set is scored once, at the end"
    else:
        best = f"best {summary['best_error']:.2f} %, best-on-test"
    print(
        f"[drmm] final test error: {summary['test_error']:.2f} % on {summary['eval_images']} test images "
        f"({best}) after {summary['steps']} steps, {summary['train_seconds']:.0f} s",
        flush=True,
    )
    return 0


def cmd_eval(args) -> int:
    name = eval_checkpoint(Path(args.run_dir), args.checkpoint)
    cfg, data, model, ckpt = load_run(Path(args.run_dir), name, args.data_dir, args.device)
    print(f"[drmm] scored {name}.pt ({describe_checkpoint(name, args.checkpoint, cfg, ckpt)})")
    err = evaluate(model, data, 0, cfg.eval_batch_size)
    print(
        f"[drmm] {args.run_dir} ({name}.pt, step {ckpt['step']}): test error {err:.2f} % "
        f"on {len(data.test_labels)} test images"
    )
    # the predicted class read as a cluster id
    report = clustering_report(data.test_labels.cpu().numpy(), predict_test(model, data, cfg.eval_batch_size))
    print(
        f"[drmm] clustering: accuracy {100 * report['cluster_acc']:.2f} % (Hungarian-matched), "
        f"NMI {report['nmi']:.4f}, ARI {report['ari']:.4f}"
    )
    return 0


def cmd_render(args) -> int:
    if args.num < 1:
        raise UsageError(f"--num must be >= 1, got {args.num}")
    cfg, data, model, _ = load_run(Path(args.run_dir), args.checkpoint, args.data_dir, args.device)
    out_dir = Path(args.out_dir or args.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = data.test_images[: args.num]
    x = data.normalize(images)
    with torch.no_grad():
        logits, latents = model(x)
        classes = logits.argmax(1) if args.classes == "predicted" else data.test_labels[: args.num]
        x_hat, levels = model.render(latents, classes, return_levels=True)
    p1 = save_reconstruction_grid(x, x_hat, out_dir / "reconstructions.png", data)
    p2 = save_level_grid(levels, out_dir / "rendered_levels.png")
    print(f"[drmm] wrote {p1} (input / reconstruction pairs) and {p2} (rendered template per level)")
    return 0


def cmd_sample(args) -> int:
    """Images drawn top-down from the switch priors, and the class appearance models (drmm/sample.py)."""
    cfg, data, model, ckpt = load_run(Path(args.run_dir), args.checkpoint, args.data_dir, args.device)
    if args.num < 1:
        raise UsageError(f"--num must be >= 1, got {args.num}")
    if args.class_ is not None and not 0 <= args.class_ < model.num_classes:
        raise UsageError(f"--class must be in 0..{model.num_classes - 1}, got {args.class_}")
    out_dir = Path(args.out_dir or args.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    dev = model.readout.weight.device
    if args.class_ is None:  # a class per sample, uniform (the readout bias is a relaxed, not a fitted, prior)
        classes = torch.randint(0, model.num_classes, (args.num,), generator=g).to(dev)
        name = "samples.png"
    else:
        classes = torch.full((args.num,), args.class_, dtype=torch.long, device=dev)
        name = f"samples_class{args.class_}.png"
    images = sample_images(model, classes, g)
    p1 = save_image_grid(images, out_dir / name, [f"c={int(c)}" for c in classes])
    p2 = save_image_grid(
        class_appearance(model),
        out_dir / "class_appearance.png",
        [f"class {c}" for c in range(model.num_classes)],
        ncols=model.num_classes,
    )
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


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (the usage is one --help away); subparsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="drmm", description="Deep Rendering Mixture Model: train, eval, render")
    parser.add_argument(
        "--debug", action="store_true", help="show the Python traceback of an error instead of its one-line message"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last.pt")
    p.add_argument("--run-dir", help="run directory (default runs/<name>-<time>)")
    p.add_argument("--data-dir", help="data root (default: config data_dir, $DRMM_DATA_DIR, ./data)")
    p.set_defaults(func=cmd_train)

    for name, func, helptext in (
        ("eval", cmd_eval, "test error of a trained run"),
        ("render", cmd_render, "PNG grids: reconstructions and per-level templates"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run_dir")
        if name == "eval":
            p.add_argument(
                "--checkpoint",
                choices=("best", "last"),
                default=None,
                help="default: best (lowest validation error) when the run has a validation split "
                "(val_samples > 0), else last",
            )
        else:
            p.add_argument("--checkpoint", choices=("best", "last"), default="last")
        p.add_argument("--data-dir")
        p.add_argument("--device", default="config", help="device (default: the run's config)")
        if name == "render":
            p.add_argument("--num", type=int, default=8, help="number of test images")
            p.add_argument(
                "--classes",
                choices=("predicted", "true"),
                default="predicted",
                help="render the predicted class's template or the true label's",
            )
            p.add_argument("--out-dir", help="where the PNGs go (default: the run dir)")
        p.set_defaults(func=func)

    add_experiment_parser(sub)  # `drmm experiment ...`: the paper's MNIST rows (experiments.py)
    add_sample_parser(sub)  # `drmm sample RUN_DIR --class c`: draws from the switch priors
    _accept_debug_anywhere(parser)
    return parser


def _accept_debug_anywhere(parser: argparse.ArgumentParser) -> None:
    """``--debug`` also after the command (``drmm eval RUN --debug``): every subparser takes it, without a default
    that would overwrite the global flag's."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
                _accept_debug_anywhere(sub)


def main(argv: Optional[List[str]] = None) -> int:
    """Run a command; its return value is the exit status. A ``UsageError`` becomes one line on stderr and
    ``SystemExit`` with status 2 (what argparse does for bad arguments; the exception's text is that line)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        if args.debug:
            raise
        command = " ".join(["drmm", args.command] + ([args.experiment] if getattr(args, "experiment", None) else []))
        line = f"{command}: error: " + " ".join(str(e).split())  # one line, whatever the message held
        print(line, file=sys.stderr, flush=True)
        exit_ = SystemExit(line)
        exit_.code = 2
        raise exit_ from None


if __name__ == "__main__":
    sys.exit(main())
