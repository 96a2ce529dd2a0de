"""Running one row: train (or resume) a seed, score the test set once, append a line to table1.csv; the CSV's
layout and provenance (commit, device, load)."""

from __future__ import annotations

import csv
import dataclasses
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import TrainConfig, config_from_dict, read_yaml_mapping, resolve_device
from ..plan import load_data
from ..run_dir import load_checkpoint
from ..train import evaluate, model_from_config, train
from .rows import (
    CHECKPOINTS,
    REPO,
    Row,
    config_hash,
    cpu_config_path,
    epochs_run,
    row_config,
    schedule_label,
    training_fields,
)

# One line per run. objective names the loss terms trained (TrainConfig.objective_label); wall_s runs from the run's
# start to its final evaluation (summed over resumes); final_val_error is the validation error of the final
# weights, best_val_error the lowest one seen during training (both empty without a split); load_average is the
# machine's at the end.
CSV_FIELDS = [
    "row",
    "labels",
    "seed",
    "schedule",
    "objective",
    "device",
    "threads",
    "wall_s",
    "epochs",
    "steps",
    "test_error",
    "test_images",
    "checkpoint",
    "val_samples",
    "final_val_error",
    "best_val_error",
    "commit",
    "config_hash",
    "run_dir",
    "finished_at",
    "load_average",
]


def recorded_run(
    records: Sequence[Dict[str, str]], out_dir: Path, rel: str, row: str, labels: str, seed: int, cfg: TrainConfig
) -> Optional[Dict[str, str]]:
    """The table1.csv line of this run, if there is one: the same run folder, or a run of the same row, N_L and
    seed whose saved config trains the same thing (a run recorded under an older hash scheme)."""
    for rec in records:
        if rec.get("run_dir") == rel:
            return rec
    for rec in records:
        saved = out_dir / rec.get("run_dir", "") / "config.yaml"
        if (
            (rec["row"], rec["labels"], rec["seed"]) == (row, labels, str(seed))
            and saved.is_file()
            and training_fields(config_from_dict(read_yaml_mapping(saved))) == training_fields(cfg)
        ):
            return rec
    return None


# ---------------------------------------------------------------- provenance


def git_commit() -> str:
    """HEAD's short hash, with "-dirty" when tracked files differ from it (the run may not be reproducible);
    results/ does not count, since every finished run appends to its table1.csv.

    $DRMM_GIT_COMMIT wins: a copy of the tree that is not a git checkout (a lent GPU machine) is told its commit.
    """
    if os.environ.get("DRMM_GIT_COMMIT"):
        return os.environ["DRMM_GIT_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("-dirty" if dirty else "")


def cpu_description(cpuinfo: str, fallback: str, cores: Optional[int]) -> str:
    """``cpu:MODEL (N cores)`` from /proc/cpuinfo's text. A model name without a digit ("AMD EPYC", as some VMs
    report it) names no generation, and two such machines ran the same schedule three times apart, so the x86
    family and model numbers are added to it."""
    fields: Dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    model = fields.get("model name") or fallback
    if not any(ch.isdigit() for ch in model) and fields.get("cpu family") and fields.get("model"):
        return f"cpu:{model} (family {fields['cpu family']} model {fields['model']}, {cores} cores)"
    return f"cpu:{model} ({cores} cores)"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    except OSError:
        cpuinfo = ""
    return cpu_description(cpuinfo, platform.processor() or platform.machine(), os.cpu_count())


def load_average() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


# ---------------------------------------------------------------- table 1: running a row


def score_checkpoint(cfg: TrainConfig, run_dir: Path, test_images: int, checkpoint: str = "last") -> float:
    """Test error (%) of the run's ``checkpoint`` (``last`` or ``best-val``) on the first ``test_images`` test images
    (0 = all)."""
    device = resolve_device(cfg.device)
    data = load_data(dataclasses.replace(cfg, max_train_samples=2, val_samples=0), device)  # test set only
    model = model_from_config(cfg, data.image_shape, data.num_classes).to(device)
    ckpt = load_checkpoint(run_dir / CHECKPOINTS[checkpoint], device)
    model.load_state_dict(ckpt["model"])
    return evaluate(model, data, test_images, cfg.eval_batch_size)


def final_val_error(run_dir: Path) -> str:
    """The validation error of the run's last evaluation (its final weights), from metrics.csv; "" without one."""
    metrics = read_csv(run_dir / "metrics.csv")
    value = metrics[-1].get("val_error", "") if metrics else ""
    return f"{float(value):.2f}" if value else ""


def upgrade_record(rec: Dict[str, str], out_dir: Path) -> Dict[str, str]:
    """A table1.csv line of an older layout in today's: ``val_error`` (the best one) becomes ``best_val_error``;
    ``final_val_error`` and ``objective`` are read from the run folder (metrics.csv, config.yaml)."""
    rec = dict(rec)
    if "val_error" in rec and "best_val_error" not in rec:
        rec["best_val_error"] = rec.pop("val_error")
    run_dir = out_dir / rec.get("run_dir", "")
    if not rec.get("final_val_error") and rec.get("best_val_error"):
        rec["final_val_error"] = final_val_error(run_dir)
    if not rec.get("objective") and (run_dir / "config.yaml").is_file():
        rec["objective"] = config_from_dict(read_yaml_mapping(run_dir / "config.yaml")).objective_label()
    return {k: rec.get(k, "") for k in CSV_FIELDS}


def append_csv(path: Path, record: Dict[str, Any]) -> None:
    """Append one line; a file in an older column layout is first rewritten in today's (``upgrade_record``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != CSV_FIELDS:
            rewrite_csv(path, [upgrade_record(rec, path.parent) for rec in read_csv(path)])
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: record.get(k, "") for k in CSV_FIELDS})


def rewrite_csv(path: Path, records: Sequence[Dict[str, Any]]) -> None:
    """Write ``records`` as the whole of ``path`` (a temporary file, then a rename: never half-written)."""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for rec in records:
            w.writerow({k: rec.get(k, "") for k in CSV_FIELDS})
    os.replace(tmp, path)


def resume_point(run_dir: Path) -> Tuple[bool, float]:
    """(whether ``run_dir`` holds a run to resume, the seconds it has trained so far)."""
    if not (run_dir / "last.pt").exists():
        return False, 0.0
    return True, float(load_checkpoint(run_dir / "last.pt")["elapsed_s"])


def record_run(
    out_dir: Path,
    row: str,
    labels: str,
    seed: int,
    schedule: str,
    cfg: TrainConfig,
    summary: Dict[str, Any],
    error: float,
    test_images: int,
    checkpoint: str,
    wall: float,
    commit: str,
    run_dir: Path,
) -> Dict[str, Any]:
    """Append one run's line to ``out_dir/table1.csv``; returns it."""
    record = {
        "row": row,
        "labels": labels,
        "seed": seed,
        "schedule": schedule,
        "objective": cfg.objective_label(),
        "device": device_description(resolve_device(cfg.device)),
        "threads": torch.get_num_threads(),
        "wall_s": f"{wall:.0f}",
        "epochs": f"{epochs_run(cfg, summary['steps']):.2f}",
        "steps": summary["steps"],
        "test_error": f"{error:.2f}",
        "test_images": test_images,
        "checkpoint": checkpoint,
        "val_samples": cfg.val_samples,
        "final_val_error": final_val_error(run_dir) if cfg.val_samples else "",
        "best_val_error": f"{summary['best_error']:.2f}" if cfg.val_samples else "",
        "commit": commit,
        "config_hash": config_hash(cfg),
        "run_dir": os.path.relpath(run_dir, out_dir),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "load_average": load_average(),
    }
    append_csv(out_dir / "table1.csv", record)
    return record


def run_row(
    row: Row,
    labels: str,
    seed: int,
    schedule: str,
    out_dir: Path,
    epochs: Optional[int] = None,
    extra: Sequence[str] = (),
    data_dir: Optional[str] = None,
    test_images: int = 10_000,
    progress: bool = False,
    checkpoint: str = "last",
    config: Optional[str] = None,
) -> Optional[Dict[str, Any]]:
    """Train one seed of one row (or resume it), score it on the test set, append the result to
    ``out_dir/table1.csv``. Returns the record, or None when table1.csv already has this run. ``config``
    replaces the row's CPU schedule (the CSV's schedule column names it)."""
    cfg = row_config(row, labels, seed, schedule, epochs, extra, data_dir, progress, config)
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    if checkpoint == "best-val" and not cfg.val_samples:
        raise ValueError("--checkpoint best-val needs a validation split (val_samples > 0 in the schedule)")
    label = schedule_label(schedule, cfg, epochs, extra, str(cpu_config_path(row, labels, config) or ""))
    name = f"{row.name}-L{labels}-s{seed}-{label.split('+')[0]}-{config_hash(cfg)[:6]}"
    run_dir = out_dir / "runs" / name
    rel = os.path.relpath(run_dir, out_dir)
    done = recorded_run(read_csv(out_dir / "table1.csv"), out_dir, rel, row.name, labels, seed, cfg)
    if done is not None:
        print(
            f"[experiment] {done['run_dir']} is already in {out_dir / 'table1.csv'}; delete its line and folder to "
            f"rerun",
            flush=True,
        )
        return None
    resume, before = resume_point(run_dir)
    print(
        f"[experiment] {row.name} N_L={labels} seed={seed} schedule={label} -> {run_dir}"
        + (f" (resuming at {before:.0f} s)" if resume else ""),
        flush=True,
    )
    commit = git_commit()  # the code the run starts with (HEAD may move while it trains)
    t0 = time.time()
    summary = train(cfg, run_dir, resume=resume)
    error = score_checkpoint(cfg, run_dir, test_images, checkpoint)
    wall = before + time.time() - t0
    record = record_run(
        out_dir,
        row.name,
        labels,
        seed,
        label,
        cfg,
        summary,
        error,
        test_images or 10_000,
        checkpoint,
        wall,
        commit,
        run_dir,
    )
    print(
        f"[experiment] {row.name} N_L={labels} seed={seed}: test error {error:.2f} % ({checkpoint} weights, "
        f"{record['test_images']} test images; paper: {row.paper.get(labels, '–')}), {summary['steps']} steps, "
        f"{wall:.0f} s, schedule {label}",
        flush=True,
    )
    return record


def read_csv(path: Path) -> List[Dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
