"""table1.md and table1_curves.png from table1.csv: the paper's numbers beside ours."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from .convergence import convergence_lines
from .rows import ALL_LABELS, CPU_STEPS, CPU_TRAIN_IMAGES, ROWS, SSL_LABELS, Row
from .runner import read_csv
from .throughput import throughput_lines

# ---------------------------------------------------------------- table 1: the report


def _mean_std(values: Sequence[float], seeds: Sequence[str] = (), kind: str = "") -> str:
    """``mean ± std (n [kind ]seeds: s1, s2, ...)``; one value has no std."""
    listed = f": {', '.join(seeds)}" if seeds else ""
    what = f"{kind} " if kind else ""
    if len(values) == 1:
        return f"{values[0]:.2f} (1 {what}seed{listed})"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ({len(values)} {what}seeds{listed})"


def seed_groups(row: Optional[Row], records: Sequence[Dict[str, str]]) -> List[Tuple[str, List[Dict[str, str]]]]:
    """``records`` split into the seeds used while the row's recipe was chosen and the held-out ones
    (``Row.held_out_from``), each with its label; one unlabelled group for rows without held-out seeds."""
    if row is None or row.held_out_from is None:
        return [("", list(records))]
    tuned = [rec for rec in records if int(rec["seed"]) < row.held_out_from]
    held = [rec for rec in records if int(rec["seed"]) >= row.held_out_from]
    return [(kind, group) for kind, group in (("", tuned), ("held-out", held)) if group]


def row_schedule(name: str, labels: str) -> Optional[str]:
    """The schedule column of a run on row ``name``'s current CPU schedule at ``labels`` (None: no such row
    or no CPU schedule); the name schedule_label gives it."""
    row = ROWS.get(name)
    return Path(row.cpu_config_file(labels)).stem if row and row.cpu_config else None


def table1_lines(records: Sequence[Dict[str, str]]) -> List[str]:
    """Markdown table: every paper number and every measured (row, N_L, schedule), side by side."""
    lines = [
        "| row | N_L | paper error % | objective | ours: test error % (mean ± std) | epochs | steps | "
        "wall time per seed | device | schedule |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = [(r.name, lab) for r in ROWS.values() for lab in (r.paper if r.supervised else SSL_LABELS)]
    keys += sorted({(rec["row"], rec["labels"]) for rec in records} - set(keys))
    for name, labels in keys:
        row = ROWS.get(name)
        paper = row.paper.get(labels) if row else None
        paper_text = f"{paper:.2f}" if paper is not None else "–"
        mine = [rec for rec in records if rec["row"] == name and rec["labels"] == labels]
        if not mine:
            if paper is not None:  # a paper number we have not tried to reproduce yet
                lines.append(f"| {name} | {labels} | {paper_text} | | not run | | | | | |")
            continue
        current = row_schedule(name, labels)
        schedules = sorted({rec["schedule"] for rec in mine})
        for schedule, objective in sorted({(rec["schedule"], rec.get("objective", "")) for rec in mine}):
            same = [rec for rec in mine if rec["schedule"] == schedule and rec.get("objective", "") == objective]
            for kind, group in seed_groups(row, same):
                lines.append(
                    _table1_line(
                        name,
                        labels,
                        paper_text,
                        schedule,
                        objective,
                        kind,
                        group,
                        schedule == current and len(schedules) > 1,
                    )
                )
    return lines


def _table1_line(
    name: str,
    labels: str,
    paper_text: str,
    schedule: str,
    objective: str,
    kind: str,
    group: Sequence[Dict[str, str]],
    chosen: bool,
) -> str:
    """One line of the Table 1 report: the runs of one (row, N_L, schedule, objective, seed group)."""
    checkpoints = "/".join(sorted({rec.get("checkpoint") or "last" for rec in group}))
    group = sorted(group, key=lambda rec: int(rec["seed"]))
    errors = [float(rec["test_error"]) for rec in group]
    images = {rec["test_images"] for rec in group}
    note = "" if images == {"10000"} else f" on {'/'.join(sorted(images))} test images"
    walls = sorted(float(rec["wall_s"]) for rec in group)  # a range: shared machines vary a lot
    wall = f"{walls[0]:.0f} s" if walls[0] == walls[-1] else f"{walls[0]:.0f}–{walls[-1]:.0f} s"
    return (
        f"| {name} | {labels} | {paper_text} | {objective or '?'} | "
        f"{_mean_std(errors, [rec['seed'] for rec in group], kind)}{note} | "
        f"{'/'.join(sorted({rec['epochs'] for rec in group}))} | "
        f"{'/'.join(sorted({rec['steps'] for rec in group}))} | "
        f"{wall} | {'; '.join(sorted({rec['device'] for rec in group}))} | "
        f"{schedule} ({checkpoints} weights){' **row schedule**' if chosen else ''} |"
    )


def curve_style(rec: Dict[str, str], split: str, schedules: Set[str]) -> Tuple[str, str]:
    """Legend label and line style of one run's curve. A panel holding runs of several schedules names the
    schedule in each label, and draws runs of a schedule other than the row's current CPU schedule dashed."""
    label = f"N_L={rec['labels']} s{rec['seed']} ({split}; test {rec['test_error']})"
    if len(schedules) < 2:
        return label, "-"
    return f"{label} {rec['schedule']}", "-" if rec["schedule"] == row_schedule(rec["row"], rec["labels"]) else "--"


# One colour per N_L and one marker per seed, so that a panel's runs at one N_L read as a family whatever
# their order in table1.csv (matplotlib's default cycle repeats after ten curves)
N_L_COLORS = {"100": "tab:blue", "600": "tab:orange", "1000": "tab:green", "3000": "tab:red", ALL_LABELS: "tab:blue"}
SEED_MARKERS = (".", "x", "^", "s", "v", "D")


def curve_color_marker(rec: Dict[str, str]) -> Tuple[str, str]:
    """Colour (by N_L) and marker (by seed) of one run's curve."""
    return N_L_COLORS.get(rec["labels"], "tab:gray"), SEED_MARKERS[int(rec["seed"]) % len(SEED_MARKERS)]


def log_axis_ends(low: float, high: float) -> Tuple[float, float]:
    """The 1-2-3-5 x 10^k values just below ``low`` and just above ``high`` (both > 0), so that a log axis
    from one to the other is labelled at both ends."""
    low, high = max(low, 1e-3), max(high, 1e-3)
    ticks = [m * 10.0**k for k in range(-3, 4) for m in (1, 2, 3, 5)]
    return max(t for t in ticks if t <= low * 1.0001), min(t for t in ticks if t >= high * 0.9999)


def plot_curves(records: Sequence[Dict[str, str]], out_dir: Path, path: Path) -> int:
    """One panel per row: validation error (test error for runs without a split) against the training step for
    every run whose metrics.csv is present. Returns the number of curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs: Dict[str, List[Tuple[Dict[str, str], List[Dict[str, str]]]]] = {}
    for rec in records:
        metrics = read_csv(out_dir / rec["run_dir"] / "metrics.csv")
        if metrics:
            runs.setdefault(rec["row"], []).append((rec, metrics))
    if not runs:
        return 0
    cols = min(3, len(runs))
    rows = math.ceil(len(runs) / cols)
    legend_lines = max(len(group) for group in runs.values())  # legends go below their panels, off the curves
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, (3.6 + 0.13 * legend_lines) * rows), squeeze=False)
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")  # 20, not 2x10^1
    for ax, (name, group) in zip(axes.flat, sorted(runs.items())):
        schedules = {rec["schedule"] for rec, _ in group}
        values = []
        for rec, metrics in group:
            split = "val" if metrics[-1].get("val_error") else "test"  # runs with a split never see the test set
            label, linestyle = curve_style(rec, split, schedules)
            errors = [float(m[f"{split}_error"]) for m in metrics]
            values += errors
            color, marker = curve_color_marker(rec)
            ax.plot(
                [int(m["step"]) for m in metrics],
                errors,
                marker=marker,
                markersize=4,
                color=color,
                linestyle=linestyle,
                label=label,
            )
        ax.set_title(name, fontsize=10), ax.set_xlabel("training step"), ax.set_ylabel("error during training (%)")
        # log axis labelled at 1, 2, 3, 5 x 10^k, its ends on such a label (the default labels only whole
        # decades, or every minor tick when the span is small)
        ax.set_yscale("log")
        ax.set_ylim(*log_axis_ends(min(values), max(values)))
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(plain), ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    for ax in list(axes.flat)[len(runs) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return sum(len(group) for group in runs.values())


def render_report(out_dir: Path) -> Path:
    """``out_dir/table1.md`` (+ ``table1_curves.png``) from table1.csv, convergence-*.json and throughput.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_csv(out_dir / "table1.csv")
    curves = plot_curves(records, out_dir, out_dir / "table1_curves.png")
    lines = [
        "# MNIST: the paper's numbers beside ours",
        "",
        "Generated by `drmm experiment report` from `table1.csv`; do not edit by hand. Paper: [P16] Table 1 "
        "(semi-supervised, N_L labels, N_U = 60K) and §4 (supervised, N_L = all). Ours: test error on the "
        "10 000 MNIST test images, scored once at the end of each run, of the weights the schedule column names "
        "(last = the final ones; best-val = the best on the validation split), mean ± std over seeds (seed = "
        'labeled-subset seed = init/data-order seed; the seeds are listed). "not run" = no measurement yet.',
        "",
        "**Objective** names the loss terms a run trained (docs/model.md#loss-terms): CE cross-entropy on the "
        "labels, RC reconstruction, NN non-negativity, KLprior the per-image KL(p(c|I) ‖ p(c)) that [P16] §4 "
        "says every experiment includes, KLent the same KL with the sign of the authors' code (entropy "
        "minimisation), KLmarg KL(batch-mean p(c|I) ‖ p(c)) (an addition), L2 Adam's weight decay (an addition); "
        "`A>B` = unsupervised phase A, then "
        "fine-tuning B. **Held-out seeds** were never used while the row's recipe was chosen.",
        "",
        "**Schedules.** A config name (`mnist-…-cpu…`) = the row's CPU schedule, sized for at most 30 minutes of "
        "training on a 2-core Intel Xeon (an older CPU can take four times as long; the device column says "
        "where each run went), settings chosen on 5000 held-out training images (docs/results.md#table-1-study); "
        "`full` = the paper's protocol as in `configs/` (Adam 1e-3 → 1e-6, 100 labeled + 100 unlabeled per "
        "batch, hundreds of epochs); `full-Nep` = the same, shortened to N epochs; `smoke-…` = "
        f"{CPU_STEPS} steps on a {CPU_TRAIN_IMAGES}-image prefix, to check that a row runs (numbers "
        "meaningless).",
        "",
    ]
    lines += table1_lines(records)
    if curves:
        lines += [
            "",
            f"![validation error during training](table1_curves.png) ({curves} runs; runs without a "
            "validation split show their test error)",
        ]
    for conv in sorted(out_dir.glob("convergence-*.json")):
        lines += ["", *convergence_lines(json.loads(conv.read_text()))]
    throughput = out_dir / "throughput.json"
    if throughput.exists():
        lines += ["", *throughput_lines(json.loads(throughput.read_text()))]
    path = out_dir / "table1.md"
    path.write_text("\n".join(lines) + "\n")
    return path
