"""``drmm experiment {table1,report,convergence,throughput}``: the argument parser and the commands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from ..errors import UsageError
from .convergence import convergence_lines, run_convergence
from .report import render_report
from .rows import ALL_LABELS, CHECKPOINTS, ROWS, SCHEDULES, SSL_LABELS, Row, default_schedule, row_config
from .runner import run_row
from .throughput import run_throughput

# ---------------------------------------------------------------- CLI (`drmm experiment ...`)


def _parse_labels(row: Row, labels: Optional[str]) -> str:
    if row.supervised:
        if labels not in (None, ALL_LABELS):
            raise ValueError(f"row {row.name} is supervised (all labels); leave --labels out or pass 'all'")
        return ALL_LABELS
    labels = labels or "100"
    if labels not in SSL_LABELS:
        raise ValueError(f"--labels must be one of {', '.join(SSL_LABELS)} for row {row.name}, got {labels}")
    return labels


def cmd_table1(args) -> int:
    row = ROWS[args.row]
    try:
        labels = _parse_labels(row, args.labels)
    except ValueError as e:
        raise UsageError(str(e)) from None
    schedule = args.schedule or ("cpu" if args.config else default_schedule())
    if args.epochs is not None and schedule != "full":
        raise UsageError("--epochs shortens the full schedule; it needs --schedule full")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        cfg = row_config(
            row, labels, seeds[0], schedule, args.epochs, args.set or [], args.data_dir, config=args.config
        )
    except ValueError as e:  # an unknown seed, N_L or schedule: nothing has run yet
        raise UsageError(str(e).replace("invalid literal for int() with base 10", "--seeds: not an integer")) from None
    if args.checkpoint == "best-val" and not cfg.val_samples:
        raise UsageError("--checkpoint best-val needs a validation split; this schedule has val_samples = 0")
    for seed in seeds:
        run_row(
            row,
            labels,
            seed,
            schedule,
            Path(args.out),
            args.epochs,
            args.set or [],
            args.data_dir,
            args.test_images,
            args.progress,
            args.checkpoint,
            args.config,
        )
    if not args.no_report:
        print(f"[experiment] wrote {render_report(Path(args.out))}")
    return 0


def cmd_report(args) -> int:
    path = render_report(Path(args.out))
    print(f"[experiment] wrote {path}")
    return 0


def cmd_convergence(args) -> int:
    result = run_convergence(
        args.model,
        args.schedule or default_schedule(),
        Path(args.out),
        args.seed,
        args.epochs,
        args.threshold,
        args.data_dir,
        args.set or [],
        args.progress,
    )
    print("\n".join(convergence_lines(result)))
    render_report(Path(args.out))
    return 0


def cmd_throughput(args) -> int:
    m = run_throughput(args.model, args.batch, Path(args.out), args.warmup, args.repeats, args.device, args.data_dir)
    for s in m["steps"]:
        print(
            f"[experiment] {m['device']} {s['model']} {s['trainer']:8s} batch {s['batch']}: "
            f"{s['images_per_s']:.0f} images/s (median step {1000 * s['median_step_s']:.1f} ms)"
        )
    r = m["eg_vs_reference"]
    print(
        f"[experiment] EG step on the {r['backend']} backend vs the reference backend, {r['pairs']} alternated pairs: "
        f"{1000 * r['reference_median_step_s']:.1f} / {1000 * r['backend_median_step_s']:.1f} ms, "
        f"{r['ratio']:.2f}x faster"
    )
    print(f"[experiment] load average before {m['load_average_before']}, after {m['load_average_after']}")
    return 0


def add_experiment_parser(sub) -> None:
    """``drmm experiment {table1,report,convergence,throughput}``; called by drmm.cli.build_parser."""
    parser = sub.add_parser("experiment", help="reproduce the paper's MNIST numbers (Table 1, §4)")
    exp = parser.add_subparsers(dest="experiment", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", default="results", help="results folder (default results/)")
        p.add_argument("--data-dir", help="data root (default: $DRMM_DATA_DIR, ./data)")

    def training(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--schedule",
            choices=SCHEDULES,
            help="cpu = the row's 30-minute CPU config; full = the paper's protocol; smoke = a few "
            "hundred steps, to check that it runs (default: full with a GPU, cpu without)",
        )
        p.add_argument("--epochs", type=int, help="shorten the full schedule to this many epochs")
        p.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="extra config override (recorded in the schedule label)"
        )
        p.add_argument("--progress", action="store_true", help="show a progress bar per epoch")

    p = exp.add_parser("table1", help="train one row of Table 1 for some seeds; append to <out>/table1.csv")
    p.add_argument("--row", required=True, choices=sorted(ROWS))
    p.add_argument("--labels", help="N_L: 100, 600, 1000 or 3000 (semi-supervised rows; default 100)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--test-images", type=int, default=10_000, help="score on the first N test images (0 = all)")
    p.add_argument(
        "--checkpoint",
        choices=sorted(CHECKPOINTS),
        default="last",
        help="weights to score on the test set: last (the final ones, default) or best-val (the best on "
        "the validation split)",
    )
    p.add_argument("--no-report", action="store_true", help="do not re-render table1.md afterwards")
    p.add_argument(
        "--config",
        help="CPU schedule to run instead of the row's own (a YAML path or a name in "
        "configs/); its name goes into the schedule column",
    )
    common(p), training(p)
    p.set_defaults(func=cmd_table1)

    p = exp.add_parser("report", help="render <out>/table1.md and table1_curves.png from the CSV")
    common(p)
    p.set_defaults(func=cmd_report)

    p = exp.add_parser("convergence", help="epochs to reach 1.5 %% test error, EG vs backprop (supervised)")
    p.add_argument("--model", default="rfm", choices=("rfm", "conv_small"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=1.5, help="test error in %% (default 1.5)")
    common(p), training(p)
    p.set_defaults(func=cmd_convergence)

    p = exp.add_parser("throughput", help="images/s of the EG and the backprop training step")
    p.add_argument("--model", default="conv_small")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="auto")
    common(p)
    p.set_defaults(func=cmd_throughput)
