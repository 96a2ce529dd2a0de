"""One trial of the Table 1 study: train a config with overrides, log its validation curve to results/study.csv.

    python experiments/study.py T10-drmm2-base --config configs/archive/mnist-drmm2-ssl-cpu.yaml --set num_labeled=100 \
        --notes "the CPU schedule as shipped"

Trials choose settings, so they are compared on the validation split only: a config without ``val_samples`` is
refused, and the test set is not looked at, not even at the end. Killed trials resume from their run folder when
the command is repeated.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from drmm.config import load_config  # noqa: E402
from drmm.paper import git_commit, read_csv  # noqa: E402
from drmm.train import train  # noqa: E402

FIELDS = [
    "trial",
    "date",
    "commit",
    "config",
    "overrides",
    "labels",
    "seed",
    "steps",
    "wall_s",
    "val_error_curve",
    "final_val_error",
    "train_labeled_acc",
    "notes",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trial", help="trial id, e.g. T10-drmm2-base (also the run folder's name)")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--notes", default="")
    p.add_argument("--out", default=str(REPO / "results" / "study.csv"))
    p.add_argument(
        "--runs",
        default=os.environ.get("DRMM_STUDY_RUNS", "study-runs"),
        help="folder of the trials' run folders (default $DRMM_STUDY_RUNS or ./study-runs)",
    )
    args = p.parse_args(argv)
    if any(rec["trial"] == args.trial for rec in read_csv(Path(args.out))):
        p.error(f"trial {args.trial} is already in {args.out}")
    cfg = load_config(args.config, args.set + ["tensorboard=false"])
    if not cfg.val_samples:
        p.error("--config/--set: val_samples is 0; study trials are compared on a validation split only")
    run_dir = Path(args.runs) / args.trial
    commit = git_commit()
    summary = train(cfg, run_dir, resume=(run_dir / "last.pt").exists(), score_test=False)
    metrics = read_csv(run_dir / "metrics.csv")
    curve = ";".join(f"{m['step']}:{float(m['val_error']):.2f}" for m in metrics)
    record = {
        "trial": args.trial,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "commit": commit,
        "config": os.path.relpath(args.config, REPO),
        "overrides": " ".join(args.set),
        "labels": cfg.num_labeled,
        "seed": cfg.seed,
        "steps": summary["steps"],
        "wall_s": f"{summary['train_seconds']:.0f}",
        "val_error_curve": curve,
        "final_val_error": f"{float(metrics[-1]['val_error']):.2f}",
        "train_labeled_acc": metrics[-1].get("train_acc", ""),
        "notes": args.notes,
    }
    new = not Path(args.out).exists()
    with open(args.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(record)
    print(
        f"[study] {args.trial}: validation error {record['final_val_error']} % after {summary['steps']} steps "
        f"({record['wall_s']} s); curve {curve}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
