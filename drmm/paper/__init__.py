"""Reproducing the paper's MNIST numbers ([P16] Table 1 and §4), one command per row.

    drmm experiment table1 --row drmm5-nn-kl --labels 100 --seeds 0,1,2 [--schedule cpu|smoke|full] [--out results/]
    drmm experiment report [--out results/]
    drmm experiment convergence --model rfm [--schedule cpu|full] [--threshold 1.5]
    drmm experiment throughput [--model conv_small] [--batch 128]

Every row is a shipped config (configs/*.yaml); ``drmm.train.train`` does the training in a run folder named after
(row, N_L, seed, schedule, config hash), so a killed run resumes when the same command is given again. The test set
is scored once, at the end, on the final weights (``--checkpoint last``, the default) or on the best-on-validation
checkpoint (``--checkpoint best-val``, only for schedules with a validation split), and one line per seed is
appended to ``<out>/table1.csv``. ``report`` turns that CSV into ``table1.md`` (the paper's number beside the mean
± std over seeds) and ``table1_curves.png``. Rows that were not run say "not run": no number is ever filled in.

Three schedules:

- ``cpu`` (the default without a GPU): the row's own CPU config (``Row.cpu_config``), sized to train in at most 30
  minutes on a 2-core Intel Xeon (an older CPU can need four times as long: docs/results.md#table-1-on-a-cpu);
  its settings were chosen on a validation split of the training images (docs/results.md#table-1-study). The
  schedule column is the config's name.
- ``full`` (the default with a GPU): the paper's protocol as the configs hold it
  (docs/model.md#architectures-and-protocol: Adam 1e-3 decaying to 1e-6, hundreds of epochs); ``--epochs N``
  shortens it, keeping everything else, and is labelled ``full-Nep``.
- ``smoke``: a few hundred steps on a 10 000-image prefix, to check that a row runs. Its numbers say nothing.

Modules: ``rows`` (the rows, their schedules and a run's identity), ``runner`` (training one seed, table1.csv),
``report`` (table1.md and the curves), ``convergence``, ``throughput`` and ``cli`` (the ``drmm experiment``
commands).
"""

from .cli import add_experiment_parser
from .convergence import convergence_lines, first_crossing, run_convergence
from .report import curve_color_marker, curve_style, log_axis_ends, plot_curves, render_report, table1_lines
from .rows import (
    ALL_LABELS,
    CPU_STEPS,
    CPU_TRAIN_IMAGES,
    ROWS,
    SSL_LABELS,
    Row,
    config_hash,
    epochs_run,
    row_config,
    schedule_label,
    schedule_overrides,
)
from .runner import (
    CSV_FIELDS,
    append_csv,
    git_commit,
    read_csv,
    record_run,
    recorded_run,
    resume_point,
    rewrite_csv,
    run_row,
    upgrade_record,
)
from .throughput import run_throughput, throughput_lines

__all__ = [
    "ALL_LABELS",
    "CPU_STEPS",
    "CPU_TRAIN_IMAGES",
    "CSV_FIELDS",
    "ROWS",
    "SSL_LABELS",
    "Row",
    "add_experiment_parser",
    "append_csv",
    "config_hash",
    "convergence_lines",
    "curve_color_marker",
    "curve_style",
    "epochs_run",
    "first_crossing",
    "git_commit",
    "log_axis_ends",
    "plot_curves",
    "read_csv",
    "record_run",
    "recorded_run",
    "render_report",
    "resume_point",
    "rewrite_csv",
    "row_config",
    "run_convergence",
    "run_row",
    "run_throughput",
    "schedule_label",
    "schedule_overrides",
    "table1_lines",
    "throughput_lines",
    "upgrade_record",
]
